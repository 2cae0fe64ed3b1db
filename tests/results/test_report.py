"""The run report: every phase the engine can emit has a colour and a legend entry."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from moesim.config.loading import load_scenario
from moesim.metrics.collector import PHASES
from moesim.results.report import COLORS, breakdown_figure, headline, timeline_figure
from moesim.results.result import RunResult
from moesim.runner import simulate
from tests.conftest import SCENARIOS


def _result() -> SimpleNamespace:
    events = [
        {"name": p, "tid": 0, "ts": 10.0 * i, "dur": 5.0, "args": {"step": 0, "layer": 0}}
        for i, p in enumerate(PHASES)
    ]
    layers = pd.DataFrame({"layer": [0, 1], **{f"{p}_s": np.ones(2) for p in PHASES}})
    result = SimpleNamespace(timeline=events, layers=layers, resolved=SimpleNamespace(world=1))
    result.breakdown = lambda: RunResult.breakdown(result)  # type: ignore[arg-type]
    return result


def test_every_phase_has_a_colour() -> None:
    assert set(COLORS) == set(PHASES)


def test_every_phase_has_a_legend_entry_in_the_timeline_and_breakdown() -> None:
    result = _result()
    for fig in (timeline_figure(result), breakdown_figure(result)):
        assert [t.name for t in fig.data] == list(PHASES)
        assert all(t.marker.color == COLORS[t.name] for t in fig.data)


def test_result_helpers_give_the_reports_data_and_figures() -> None:
    """What a notebook reads: the headline, the breakdown (summing to the summary's phase
    seconds per layer), and each report figure by name."""
    result = simulate(load_scenario(SCENARIOS / "quickstart.yaml", ["workload.steps=2"]))
    assert list(result.headline()["label"]) == [label for label, _, _ in headline(result.summary)]
    table = result.breakdown()
    assert list(table.columns) == list(PHASES)
    assert len(table) == result.resolved.model.num_layers
    per_step = result.layers.groupby(["step", "gpu"])[[f"{p}_s" for p in PHASES]].sum().mean()
    assert np.allclose(table.sum().to_numpy(), per_step.to_numpy())
    spans = result.timeline_table()
    assert len(spans) == len(result.timeline) and set(spans["phase"]) <= set(PHASES)
    step0 = spans[spans.step == 0]
    # every GPU's spans of step 0 end by the step's slowest time
    assert (step0.start_us + step0.duration_us).max() <= result.summary[
        "step_time_max_s"
    ] * 1e6 + 1e-6
    figs = result.figures()
    assert list(figs)[:2] == ["timeline", "breakdown"]
    assert {"tokens", "ops", "links"} <= set(figs)
    assert result.figure("tokens") is not None
    with pytest.raises(KeyError, match="it has: timeline, breakdown"):
        result.figure("nothing")
