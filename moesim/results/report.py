"""``report.html``: a self-contained plotly report of one run.

It opens on the headline (step time, tokens/s, exposed communication, drops, imbalance, HBM,
where the op costs came from), then the panels: the timeline of the first recorded step (one
row per GPU), the per-layer breakdown of time by phase, the tokens each GPU computes per MoE
layer, and (prefill and training with drops) the drop rate by token position. plotly is
imported here only, so that runs without a report never load it.
"""

from __future__ import annotations

import html
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from moesim import jsonout
from moesim.metrics.collector import PHASES

if TYPE_CHECKING:
    import pandas as pd


class RunLike(Protocol):
    """What the report reads of a run (:class:`moesim.results.result.RunResult`, which builds
    its figures here: the report does not import it back)."""

    resolved: Any
    summary: dict[str, Any]
    layers: pd.DataFrame
    links: pd.DataFrame | None

    @property
    def timeline(self) -> list[dict[str, Any]]:
        """Chrome-trace events of the first steps."""
        ...

    def breakdown(self) -> pd.DataFrame:
        """Seconds per layer by phase."""
        ...

    def figures(self) -> dict[str, Any]:
        """The report's figures by name."""
        ...


COLORS = {
    "attention": "#4C78A8",
    "gate": "#9D755D",
    "dispatch": "#F58518",
    "expert_compute": "#54A24B",
    "shared_expert": "#88D27A",
    "dense_ffn": "#B279A2",
    "combine": "#E45756",
    "tp_comm": "#FF9DA6",
    "migrate": "#BAB0AC",
    "offload_wait": "#72B7B2",
    "dp_comm": "#EECA3B",
    "optimizer": "#79706E",
}


PIPELINE_COLORS = {
    "F": "#4C78A8",
    "B": "#F58518",
    "F&B": "#54A24B",
    "Bi": "#E45756",
    "W": "#B279A2",
}
"""Colours of a pipeline timeline's ops: forward, backward, DualPipe's overlapped pair, and a
zero-bubble backward's input-gradient and weight-gradient parts."""


def timeline_figure(result: RunLike) -> Any:
    """Gantt-style bars of the first recorded step, one row per GPU (pipelined training: one
    row per stage, a bar per forward or backward op of a micro-batch)."""
    import plotly.graph_objects as go

    events = [e for e in result.timeline if e["args"]["step"] == 0]
    if any(e.get("cat") == "pipeline" for e in events):
        return _pipeline_figure(events, result.summary)
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


def _pipeline_figure(events: list[dict[str, Any]], summary: dict[str, Any]) -> Any:
    import plotly.graph_objects as go

    fig = go.Figure()
    for name, color in PIPELINE_COLORS.items():
        ev = [e for e in events if e["name"] == name]
        if not ev:
            continue
        fig.add_trace(
            go.Bar(
                name=name,
                orientation="h",
                marker_color=color,
                marker_line={"width": 0.5, "color": "white"},
                y=[f"stage {e['args']['stage']}" for e in ev],
                x=[e["dur"] / 1e3 for e in ev],
                base=[e["ts"] / 1e3 for e in ev],
                customdata=[
                    f"micro-batch {e['args']['micro_batch']}, chunk {e['args']['chunk']}"
                    for e in ev
                ],
                hovertemplate="%{y} %{customdata}<br>start %{base:.2f} ms, %{x:.2f} ms",
            )
        )
    p = summary.get("pipeline", {})
    fig.update_layout(
        title=(
            f"Pipeline of step 0: {p.get('schedule', '')}, {p.get('pp', 1)} stages, "
            f"{p.get('micro_batches', 1)} micro-batches, bubble "
            f"{float(p.get('bubble_fraction', 0.0)):.1%} (ms)"
        ),
        barmode="overlay",
        xaxis_title="time (ms)",
        height=220 + 28 * max(1, int(p.get("pp", 1))),
        yaxis={"autorange": "reversed"},
    )
    return fig


def breakdown_figure(result: RunLike) -> Any:
    """Stacked seconds per layer by phase (mean over steps and GPUs)."""
    import plotly.graph_objects as go

    df = result.breakdown()
    fig = go.Figure()
    for p in PHASES:
        if df[p].any():
            fig.add_trace(go.Bar(name=p, x=df.index, y=df[p] * 1e6, marker_color=COLORS[p]))
    fig.update_layout(
        title="Time per layer by phase (us, mean over steps and GPUs)",
        barmode="stack",
        xaxis_title="layer",
        yaxis_title="us",
    )
    return fig


def ops_figure(result: RunLike) -> Any | None:
    """Seconds per step of each op (forward, and ``_bwd`` backward), with the table behind it
    in the hover (summary ``ops_s`` and ``cost_sources``)."""
    import plotly.graph_objects as go

    ops = result.summary.get("ops_s") or {}
    if not ops:
        return None
    sources = result.summary.get("cost_sources", {})
    order = sorted(ops, key=lambda op: ops[op])
    fig = go.Figure(
        go.Bar(
            x=[ops[op] * 1e3 for op in order],
            y=order,
            orientation="h",
            customdata=[sources.get(op.removesuffix("_bwd"), "")[:160] for op in order],
            hovertemplate="%{y}: %{x:.3f} ms<br>%{customdata}<extra></extra>",
        )
    )
    fig.update_layout(
        title="Compute per step by op (ms, mean over GPUs; hover: where the cost comes from)",
        xaxis_title="ms per step",
        height=160 + 18 * len(order),
    )
    return fig


def tokens_figure(result: RunLike) -> Any:
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


def drops_by_position_figure(summaries: dict[str, dict[str, Any]]) -> Any | None:
    """Drop rate against token position, one line per run (None when no run has drops by
    position: decode, or nothing dropped)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for label, s in summaries.items():
        curve = s.get("drop_rate_by_position")
        if curve and any(curve["rate"]):
            fig.add_trace(go.Scatter(x=curve["position_start"], y=curve["rate"], name=label))
    if not fig.data:
        return None
    fig.update_layout(
        title="Drop rate by token position (bins of the sequence)",
        xaxis_title="position in sequence (bin start)",
        yaxis_title="dropped / routed",
        yaxis_tickformat=".0%",
    )
    return fig


GIB = 2**30


def cost_origin(source: str) -> str:
    """Where one op's cost came from, in a word: a measured or published kernel table, or
    the roofline / bandwidth model (a ``cost_sources`` value)."""
    if " table (measured" in source:
        return "measured tables"
    if " table (" in source:
        return "published tables"
    return "roofline / bandwidth"


def headline(summary: dict[str, Any]) -> list[tuple[str, str, str]]:
    """The answer first: ``(label, value, detail)`` of the figures a reader looks for."""
    step = float(summary["step_time_s"])
    exposed = float(summary["breakdown_s"].get("exposed_comm", 0.0))
    hbm, cap = float(summary["hbm_peak_bytes"]), float(summary["hbm_capacity_bytes"])
    origins = Counter(cost_origin(src) for src in summary.get("cost_sources", {}).values())
    costs = ", ".join(f"{n} from {k}" for k, n in sorted(origins.items())) or "no ops priced"
    slowest = seconds_text(float(summary["step_time_max_s"]))
    tokens = f"{summary['tokens_per_step']:,} tokens a step on {summary['gpus']} GPUs"
    drops = f"{summary['tokens_dropped']:,} of {summary['tokens_routed']:,} assignments"
    return [
        ("step time", seconds_text(step), f"{_steps(int(summary['steps']))}, slowest {slowest}"),
        ("tokens/s", f"{float(summary['tokens_per_s']):,.0f}", tokens),
        ("exposed communication", seconds_text(exposed), f"{exposed / step:.0%} of the step"),
        ("drop rate", f"{float(summary['drop_rate']):.2%}", drops),
        ("imbalance", f"{float(summary['imbalance_max_over_mean']):.3f}", "busiest GPU / mean"),
        ("HBM per GPU", f"{hbm / GIB:.1f} / {cap / GIB:.1f} GiB", f"{hbm / cap:.0%} of capacity"),
        ("op costs", f"{sum(origins.values())} ops", costs),
        *_training_headline(summary),
    ]


def _training_headline(summary: dict[str, Any]) -> list[tuple[str, str, str]]:
    """Training: throughput per GPU and MFU; pipelined: the bubble."""
    out = []
    t = summary.get("training")
    if t:
        out.append(
            (
                "tokens/s per GPU",
                f"{float(t['tokens_per_s_per_gpu']):,.0f}",
                f"{float(t['model_tflops_per_gpu']):,.0f} model TFLOP/s, MFU {float(t['mfu']):.1%}",
            )
        )
    p = summary.get("pipeline")
    if p:
        out.append(
            (
                "pipeline bubble",
                f"{float(p['bubble_fraction']):.1%}",
                f"{p['schedule']}, pp {p['pp']}, {p['micro_batches']} micro-batches",
            )
        )
    return out


def headline_html(summary: dict[str, Any]) -> str:
    """:func:`headline` as a row of cards."""
    cards = "".join(
        "<div style='border:1px solid #ddd;border-radius:6px;padding:8px 14px;min-width:150px'>"
        f"<div style='color:#666;font-size:13px'>{html.escape(label)}</div>"
        f"<div style='font-size:22px;font-weight:bold'>{html.escape(value)}</div>"
        f"<div style='color:#666;font-size:12px'>{html.escape(detail)}</div></div>"
        for label, value, detail in headline(summary)
    )
    return f"<div style='display:flex;flex-wrap:wrap;gap:10px;margin:10px 0 20px'>{cards}</div>"


def headline_table(summaries: dict[str, dict[str, Any]], by_row: bool = False) -> str:
    """:func:`headline` of several runs: a column per run (a compare report's head), or a row
    per run (``by_row``: a sweep's grid points)."""
    rows = {name: headline(s) for name, s in summaries.items()}
    labels = [label for label, _, _ in next(iter(rows.values()))] if rows else []
    cell = "text-align:right;padding:4px 10px"
    first = "padding:4px 10px;font-weight:bold"
    if by_row:
        head = "".join(f"<th style='{cell}'>{html.escape(label)}</th>" for label in labels)
        body = "".join(
            f"<tr><td style='{first}'>{html.escape(name)}</td>"
            + "".join(f"<td style='{cell}'>{html.escape(v)}</td>" for _, v, _ in r)
            + "</tr>"
            for name, r in rows.items()
        )
    else:
        head = "".join(f"<th style='{cell}'>{html.escape(n)}</th>" for n in rows)
        body = "".join(
            f"<tr><td style='{first}'>{html.escape(label)}</td>"
            + "".join(f"<td style='{cell}'>{html.escape(r[i][1])}</td>" for r in rows.values())
            + "</tr>"
            for i, label in enumerate(labels)
        )
    table = f"<tr><th></th>{head}</tr>{body}"
    return f"<table style='border-collapse:collapse;margin:10px 0 20px'>{table}</table>"


def _steps(n: int) -> str:
    return f"{n:,} step" if n == 1 else f"{n:,} steps"


def seconds_text(seconds: float) -> str:
    """A step-scale time as the summary table and the report print it: us below a
    millisecond, else ms."""
    return f"{seconds * 1e6:,.1f} us" if seconds < 1e-3 else f"{seconds * 1e3:,.3f} ms"


def html_page(title: str, intro: str, figs: list[Any], footer: str = "", head: str = "") -> str:
    """One self-contained HTML page (plotly.js inlined once): title, intro, ``head`` (the
    headline block), ``figs``, then ``footer``."""
    import plotly.io as pio

    parts = [pio.to_html(f, full_html=False, include_plotlyjs=(i == 0)) for i, f in enumerate(figs)]
    t = html.escape(title)
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>moesim: {t}</title></head>"
        f"<body style='font-family:sans-serif'><h1>{t}</h1><p>{html.escape(intro)}</p>"
        + head
        + "".join(parts)
        + footer
        + "</body></html>"
    )


def links_figure(result: RunLike) -> Any | None:
    """Busiest link of each kind in every collective phase: utilisation against time."""
    table = result.links
    if table is None or table.empty:
        return None
    import plotly.graph_objects as go

    fig = go.Figure()
    peak = table.groupby(["kind", "phase"], observed=True).agg(
        start_s=("start_s", "first"), utilisation=("utilisation", "max")
    )
    for kind, g in peak.groupby(level="kind", observed=True):
        fig.add_scatter(x=g["start_s"] * 1e3, y=g["utilisation"], mode="markers", name=str(kind))
    fig.update_layout(
        title="Busiest link per kind in each collective phase (bytes / capacity / phase span)",
        xaxis_title="phase start (ms)",
        xaxis_tickformat=",.4~g",
        yaxis_title="utilisation",
        yaxis_tickformat=".0%",
        yaxis_hoverformat=".1%",
        xaxis_hoverformat=",.3f",
        height=380,
    )
    return fig


def write_report(result: RunLike, path: Path) -> None:
    """Write the report to ``path`` as one HTML file with plotly.js inlined."""
    figs = list(result.figures().values())
    summary = html.escape(jsonout.dumps(result.summary, indent=2, sort_keys=True))
    page = html_page(
        f"moesim run: {result.resolved.scenario.name}",
        result.resolved.scenario.description,
        figs,
        f"<h2>summary.json</h2><pre>{summary}</pre>",
        head=headline_html(result.summary),
    )
    path.write_text(page, encoding="utf-8")
