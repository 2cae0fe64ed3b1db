"""``moesim validate --report F.html``: predicted vs published, and where each case's time goes.

Figures: the DeepEP rows' bandwidths (published vs predicted), each end-to-end case on each
profile (predicted over published), and a per-op breakdown of every end-to-end case (seconds per
step of each op, forward and backward, mean over GPUs), so that a person sees which kernels a
prediction's error can come from.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from moesim.results.report import html_page

if TYPE_CHECKING:
    from moesim.validation.deepep import Row
    from moesim.validation.e2e import E2ERow

TOP_OPS = 16
"""Ops shown by name in the breakdown; the rest are summed as 'other'."""


def _versus(labels: list[str], published: list[float], predicted: list[float],
             errors: list[float]) -> Any:  # fmt: skip
    """Grouped bars of published and predicted values, each prediction labelled with its error."""
    import plotly.graph_objects as go

    fig = go.Figure()
    fig.add_bar(name="published", x=labels, y=published)
    fig.add_bar(
        name="predicted",
        x=labels,
        y=predicted,
        text=[f"{e:+.1%}" for e in errors],
        textposition="outside",
    )
    fig.update_layout(barmode="group", yaxis_tickformat=",.0f")
    return fig


def deepep_figure(rows: list[Row]) -> Any:
    """Bottleneck bandwidth, published vs predicted, per DeepEP row."""
    fig = _versus(
        [f"{r.kind} EP{r.ep} {r.phase}" for r in rows],
        [r.published_gb_per_s for r in rows],
        [r.predicted_gb_per_s for r in rows],
        [r.error for r in rows],
    )
    fig.update_layout(
        title="DeepEP normal kernels on H800: bottleneck bandwidth", yaxis_title="GB/s"
    )
    return fig


def e2e_figure(rows: list[E2ERow]) -> Any:
    """Each end-to-end case on each profile: predicted over published (the cases count different
    things, tokens/s or milliseconds, so one axis holds their ratios), the two figures in the
    hover text."""
    import plotly.graph_objects as go

    fig = go.Figure()
    fig.add_bar(
        x=[f"{r.case}<br>{r.profile}" for r in rows],
        y=[r.predicted / r.published for r in rows],
        text=[f"{r.error:+.1%}" for r in rows],
        textposition="outside",
        hovertext=[
            f"{r.counted_as}: published {r.published:,.1f}, predicted {r.predicted:,.1f}"
            for r in rows
        ],
    )
    fig.add_hline(y=1.0, line_dash="dot")
    fig.update_layout(
        title="End-to-end published measurements: predicted / published",
        yaxis_title="predicted / published",
    )
    return fig


def ops_figure(rows: list[E2ERow]) -> Any:
    """Stacked seconds per step of the largest ops of each case and profile."""
    import plotly.graph_objects as go

    totals: dict[str, float] = {}
    for r in rows:
        for op, sec in r.ops_s.items():
            totals[op] = totals.get(op, 0.0) + sec
    top = sorted(totals, key=lambda op: -totals[op])[:TOP_OPS]
    labels = [f"{r.case}<br>{r.profile}" for r in rows]
    fig = go.Figure()
    for op in top:
        fig.add_bar(name=op, x=labels, y=[r.ops_s.get(op, 0.0) * 1e3 for r in rows])
    fig.add_bar(
        name="other ops",
        x=labels,
        y=[sum(v for k, v in r.ops_s.items() if k not in top) * 1e3 for r in rows],
    )
    fig.add_scatter(
        name="step time",
        x=labels,
        y=[r.step_time_s * 1e3 for r in rows],
        mode="markers",
        marker={"symbol": "line-ew-open", "size": 40, "color": "black"},
    )
    fig.update_layout(
        title="Per-op compute of each case (ms per step, mean over GPUs; step time marked)",
        yaxis_title="ms",
        barmode="stack",
        yaxis_tickformat=",.0f",
    )
    return fig


def validation_html(deepep: list[Row], e2e: list[E2ERow]) -> str:
    """The whole report page."""
    intro = (
        "Predictions from profile facts and kernel tables, compared with published measurements "
        "(../shared/validation/published.md); nothing is fitted to the published figures."
    )
    figs = [deepep_figure(deepep)] + ([e2e_figure(e2e), ops_figure(e2e)] if e2e else [])
    return html_page("moesim validate", intro, figs)
