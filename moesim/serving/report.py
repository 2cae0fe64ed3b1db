"""The files of a serving run: its folder, and its report (latency CDFs, batch size and KV
cache over time)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from moesim.serving.run import ServingResult


def latency_figure(result: ServingResult) -> Any:
    """CDFs of TTFT, TPOT and end-to-end latency (ms) of the counted requests."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    warmup = result.resolved.scenario.serving.requests.warmup  # type: ignore[union-attr]
    table = result.requests.iloc[warmup:]
    fig = make_subplots(rows=1, cols=3, subplot_titles=("TTFT", "TPOT", "end-to-end"))
    for col, name in enumerate(("ttft_s", "tpot_s", "e2e_s"), start=1):
        x = np.sort(table[name].to_numpy())
        x = x[np.isfinite(x)] * 1e3
        y = np.arange(1, x.size + 1) / max(x.size, 1)
        fig.add_trace(go.Scatter(x=x, y=y, mode="lines", name=name[:-2]), row=1, col=col)
        fig.update_xaxes(title_text="ms", row=1, col=col)
    fig.update_yaxes(title_text="fraction of requests", row=1, col=1)
    fig.update_layout(title="Latency distributions (counted requests)", showlegend=False)
    return fig


def load_figure(result: ServingResult) -> Any:
    """Decode batch size and KV cache in use over time, per instance."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    steps = result.steps
    fig = make_subplots(
        rows=2, cols=1, shared_xaxes=True, subplot_titles=("decode batch", "KV cache tokens")
    )
    for inst, rows in steps.groupby("instance"):
        dec = rows[rows.decoding > 0]
        if len(dec):
            fig.add_trace(
                go.Scatter(x=dec.start_s, y=dec.decoding, mode="lines", name=f"instance {inst}"),
                row=1,
                col=1,
            )
        fig.add_trace(
            go.Scatter(x=rows.start_s, y=rows.kv_tokens, mode="lines", name=f"instance {inst} KV"),
            row=2,
            col=1,
        )
    fig.update_xaxes(title_text="time (s)", row=2, col=1)
    fig.update_layout(title="Batch and KV cache over time")
    return fig


def serving_report(result: ServingResult) -> str:
    """The report page."""
    from moesim.results.report import html_page

    sv = result.summary["serving"]
    intro = (
        f"{sv['finished']:,} of {sv['counted']:,} counted requests finished; "
        f"{sv['output_tokens_per_s']:,.0f} output tokens/s "
        f"({sv['output_tokens_per_s_per_gpu']:,.0f} per GPU); TTFT p50 "
        f"{sv['ttft_s']['p50'] * 1e3:,.1f} ms, p99 {sv['ttft_s']['p99'] * 1e3:,.1f} ms; TPOT p50 "
        f"{sv['tpot_s']['p50'] * 1e3:,.1f} ms; goodput {sv['goodput_requests_per_s']:,.2f} "
        "requests/s."
    )
    title = f"moesim serving: {result.resolved.scenario.name}"
    return html_page(title, intro, [latency_figure(result), load_figure(result)])


def write_serving_run(result: ServingResult, out_root: str | Path | None = None) -> Path:
    """Write ``<out_root>/<scenario>/<run-id>/`` atomically: ``scenario.yaml``,
    ``summary.json``, ``requests.parquet``, ``steps.parquet`` and ``report.html``."""
    from moesim.results.writer import write_scenario_run

    def fill(tmp: Path) -> None:
        result.requests.to_parquet(tmp / "requests.parquet", index=False)
        result.steps.to_parquet(tmp / "steps.parquet", index=False)
        if result.resolved.scenario.output.report:
            (tmp / "report.html").write_text(serving_report(result), encoding="utf-8")

    return write_scenario_run(result.resolved, result.summary, fill, out_root)
