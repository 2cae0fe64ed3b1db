"""What one run produced, handed from the runner to the writers and the notebook API."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import pandas as pd

from moesim.config.loading import ResolvedScenario
from moesim.metrics.collector import PHASES, Collector


@dataclass
class RunResult:
    """Everything a run produced.

    Attributes:
        resolved: The scenario that ran.
        summary: The ``summary.json`` content.
        layers: The ``layers.parquet`` table.
        collector: The raw arrays.
        events_processed: SimPy events processed, or the per-GPU resumptions of the lockstep
            walk (:mod:`moesim.timing.lockstep`), for benchmarks.
        links: The ``links.parquet`` table (:mod:`moesim.metrics.links`).
    """

    resolved: ResolvedScenario
    summary: dict[str, Any]
    layers: pd.DataFrame
    collector: Collector
    events_processed: int
    links: pd.DataFrame | None = None

    @functools.cached_property
    def timeline(self) -> list[dict[str, Any]]:
        """Chrome-trace events of the first steps (built when first read)."""
        return self.collector.timeline()

    def headline(self) -> pd.DataFrame:
        """The report's headline block as a table: ``label``, ``value``, ``detail``."""
        from moesim.results.report import headline

        return pd.DataFrame(headline(self.summary), columns=["label", "value", "detail"])

    def breakdown(self) -> pd.DataFrame:
        """Seconds per layer (rows) by phase (columns), mean over steps and GPUs: the data of
        the report's breakdown figure."""
        table = self.layers.groupby("layer")[[f"{p}_s" for p in PHASES]].mean()
        return table.rename(columns=lambda c: c.removesuffix("_s"))

    def timeline_table(self) -> pd.DataFrame:
        """The recorded timeline (the first steps, as in ``timeline.json``) as a table: one row
        per span, with ``step``, ``layer``, ``gpu``, ``micro_batch``, ``phase``, ``kind``
        (compute or comm), ``start_us`` and ``duration_us``. Pipelined training records one span
        per op of each stage instead: ``kind`` pipeline, ``phase`` F, B, F&B, Bi or W, ``gpu``
        the stage's first, ``layer`` -1."""
        world = self.resolved.world
        return pd.DataFrame(
            {
                "step": [e["args"]["step"] for e in self.timeline],
                "layer": [e["args"].get("layer", -1) for e in self.timeline],
                "gpu": [e["tid"] % world for e in self.timeline],
                "micro_batch": [e["args"].get("micro_batch", 0) for e in self.timeline],
                "phase": [e["name"] for e in self.timeline],
                "kind": [e["cat"] for e in self.timeline],
                "start_us": [e["ts"] for e in self.timeline],
                "duration_us": [e["dur"] for e in self.timeline],
            }
        )

    def figures(self) -> dict[str, Any]:
        """The report's figures (plotly), by name, in the report's order: ``timeline``,
        ``breakdown``, ``ops``, ``tokens``, ``links``, ``drops_by_position``; a figure with
        nothing to show (no links table, no drops) is left out."""
        from moesim.results import report

        figs = {
            "timeline": report.timeline_figure(self),
            "breakdown": report.breakdown_figure(self),
            "ops": report.ops_figure(self),
            "tokens": report.tokens_figure(self),
            "links": report.links_figure(self),
            "drops_by_position": report.drops_by_position_figure(
                {self.resolved.scenario.name: self.summary}
            ),
        }
        return {name: fig for name, fig in figs.items() if fig is not None}

    def figure(self, name: str) -> Any:
        """One report figure by name (see :meth:`figures`).

        Raises:
            KeyError: no such figure in this run's report, with the ones there are.
        """
        figs = self.figures()
        if name not in figs:
            raise KeyError(f"no figure {name!r} in this run's report; it has: {', '.join(figs)}")
        return figs[name]
