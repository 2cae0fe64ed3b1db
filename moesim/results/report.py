"""``report.html``: a self-contained plotly report of one run.

Panels: the timeline of the first recorded step (one row per GPU), the per-layer breakdown of
time by phase, and the tokens each GPU computes per MoE layer. plotly is imported here only,
so that runs without a report never load it.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moesim.metrics.collector import PHASES

if TYPE_CHECKING:
    from moesim.runner import RunResult

COLORS = {
    "attention": "#4C78A8",
    "gate": "#9D755D",
    "dispatch": "#F58518",
    "expert_compute": "#54A24B",
    "shared_expert": "#88D27A",
    "dense_ffn": "#B279A2",
    "combine": "#E45756",
    "tp_comm": "#FF9DA6",
}


def timeline_figure(result: RunResult) -> Any:
    """Gantt-style bars of the first recorded step, one row per GPU."""
    import plotly.graph_objects as go

    events = [e for e in result.timeline if e["args"]["step"] == 0]
    fig = go.Figure()
    for phase in PHASES:
        ev = [e for e in events if e["name"] == phase]
        if not ev:
            continue
        fig.add_trace(
            go.Bar(
                name=phase,
                orientation="h",
                marker_color=COLORS[phase],
                y=[f"gpu {e['tid']}" for e in ev],
                x=[e["dur"] for e in ev],
                base=[e["ts"] for e in ev],
                customdata=[e["args"]["layer"] for e in ev],
                hovertemplate="%{y} layer %{customdata}<br>start %{base:.1f} us, %{x:.1f} us",
            )
        )
    fig.update_layout(
        title="Timeline of step 0 (microseconds)",
        barmode="overlay",
        xaxis_title="time (us)",
        height=200 + 22 * result.resolved.world,
        yaxis={"autorange": "reversed"},
    )
    return fig


def breakdown_figure(result: RunResult) -> Any:
    """Stacked seconds per layer by phase (mean over steps and GPUs)."""
    import plotly.graph_objects as go

    df = result.layers.groupby("layer")[[f"{p}_s" for p in PHASES]].mean()
    fig = go.Figure()
    for p in PHASES:
        if df[f"{p}_s"].any():
            fig.add_trace(go.Bar(name=p, x=df.index, y=df[f"{p}_s"] * 1e6, marker_color=COLORS[p]))
    fig.update_layout(
        title="Time per layer by phase (us, mean over steps and GPUs)",
        barmode="stack",
        xaxis_title="layer",
        yaxis_title="us",
    )
    return fig


def tokens_figure(result: RunResult) -> Any:
    """Heatmap of tokens computed per GPU and MoE layer (mean over steps)."""
    import plotly.graph_objects as go

    moe = result.layers[result.layers["moe"]]
    table = moe.pivot_table(index="layer", columns="gpu", values="tokens_computed", aggfunc="mean")
    fig = go.Figure(
        go.Heatmap(
            z=table.values,
            x=[f"gpu {g}" for g in table.columns],
            y=table.index,
            colorscale="Viridis",
            colorbar={"title": "tokens"},
        )
    )
    fig.update_layout(
        title="Token-expert assignments computed per GPU (mean over steps)",
        xaxis_title="GPU",
        yaxis_title="MoE layer",
    )
    return fig


def write_report(result: RunResult, path: Path) -> None:
    """Write the report to ``path`` as one HTML file with plotly.js inlined."""
    import plotly.io as pio

    figs = [timeline_figure(result), breakdown_figure(result), tokens_figure(result)]
    parts = [pio.to_html(f, full_html=False, include_plotlyjs=(i == 0)) for i, f in enumerate(figs)]
    summary = html.escape(json.dumps(result.summary, indent=2, sort_keys=True))
    title = html.escape(result.resolved.scenario.name)
    path.write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>moesim: {title}</title></head>"
        f"<body style='font-family:sans-serif'><h1>moesim run: {title}</h1>"
        f"<p>{html.escape(result.resolved.scenario.description)}</p>"
        + "".join(parts)
        + f"<h2>summary.json</h2><pre>{summary}</pre></body></html>",
        encoding="utf-8",
    )
