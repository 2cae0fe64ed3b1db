"""The run report: every phase the engine can emit has a colour and a legend entry."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd

from moesim.metrics.collector import PHASES
from moesim.results.report import COLORS, breakdown_figure, timeline_figure


def _result() -> SimpleNamespace:
    events = [
        {"name": p, "tid": 0, "ts": 10.0 * i, "dur": 5.0, "args": {"step": 0, "layer": 0}}
        for i, p in enumerate(PHASES)
    ]
    layers = pd.DataFrame({"layer": [0, 1], **{f"{p}_s": np.ones(2) for p in PHASES}})
    return SimpleNamespace(timeline=events, layers=layers, resolved=SimpleNamespace(world=1))


def test_every_phase_has_a_colour() -> None:
    assert set(COLORS) == set(PHASES)


def test_every_phase_has_a_legend_entry_in_the_timeline_and_breakdown() -> None:
    result = _result()
    for fig in (timeline_figure(result), breakdown_figure(result)):
        assert [t.name for t in fig.data] == list(PHASES)
        assert all(t.marker.color == COLORS[t.name] for t in fig.data)
