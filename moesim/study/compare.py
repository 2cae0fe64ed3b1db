"""Comparing runs: one row per scenario or run folder, and a plotly comparison report.

Notebook use::

    from moesim.study.compare import compare
    table, summaries = compare(["scenarios/a.yaml", "results/b/20261123T...-seed0"])

Each entry is a scenario YAML (simulated here, nothing written) or a run folder holding a
``summary.json``. The table's columns are :data:`COLUMNS`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from moesim import jsonout
from moesim.errors import MoesimError

GiB = 1024**3

#: column -> (header, value from a summary)
COLUMNS: dict[str, tuple[str, Callable[[dict[str, Any]], float]]] = {
    "step_time_ms": ("step time (ms)", lambda s: s["step_time_s"] * 1e3),
    "tokens_per_s": ("tokens/s", lambda s: s["tokens_per_s"]),
    "exposed_comm_ms": ("exposed comm (ms)", lambda s: s["breakdown_s"]["exposed_comm"] * 1e3),
    "imbalance": ("imbalance max/mean", lambda s: s["imbalance_max_over_mean"]),
    "drop_rate": ("drop rate", lambda s: s["drop_rate"]),
    "hbm_gib": ("HBM/GPU (GiB)", lambda s: s["hbm_peak_bytes"] / GiB),
    "offload_stall_ms": (
        "offload stall (ms)",
        lambda s: s.get("offload", {}).get("stall_s", 0.0) * 1e3,
    ),
    "inter_node_gb": ("inter-node GB/step", lambda s: s["bytes_inter_node"] / 1e9),
}

#: serving runs (``workload.mode: serve``): column -> (header, value from a summary)
SERVING_COLUMNS: dict[str, tuple[str, Callable[[dict[str, Any]], float]]] = {
    "request_rate": ("requests/s", lambda s: s["serving"]["request_rate_per_s"]),
    "output_tok_s_per_gpu": (
        "output tokens/s/GPU",
        lambda s: s["serving"]["output_tokens_per_s_per_gpu"],
    ),
    "ttft_p50_ms": ("TTFT p50 (ms)", lambda s: s["serving"]["ttft_s"]["p50"] * 1e3),
    "ttft_p99_ms": ("TTFT p99 (ms)", lambda s: s["serving"]["ttft_s"]["p99"] * 1e3),
    "tpot_p50_ms": ("TPOT p50 (ms)", lambda s: s["serving"]["tpot_s"]["p50"] * 1e3),
    "tpot_p99_ms": ("TPOT p99 (ms)", lambda s: s["serving"]["tpot_s"]["p99"] * 1e3),
    "goodput_rps": ("goodput (req/s)", lambda s: s["serving"]["goodput_requests_per_s"]),
}

#: every metric column, for telling them from grid columns
METRICS = {**COLUMNS, **SERVING_COLUMNS}


def columns_for(summaries: list[dict[str, Any]]) -> dict[str, tuple[str, Callable[..., float]]]:
    """The metric columns of a set of runs: serving ones when the runs serve requests."""
    serving = any(s.get("mode") == "serve" for s in summaries if "error" not in s)
    return SERVING_COLUMNS if serving else COLUMNS


def load_entry(entry: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """The summary of a run folder, or of simulating a scenario file.

    Raises:
        MoesimError: the path is neither a ``.yaml`` scenario nor a folder with summary.json.
    """
    import json

    path = Path(entry)
    if path.is_dir():
        summary = path / "summary.json"
        if not summary.is_file():
            raise MoesimError(f"{path}: not a run folder (no summary.json in it)")
        data: dict[str, Any] = json.loads(summary.read_text(encoding="utf-8"))
        return data
    if path.suffix in (".yaml", ".yml"):
        from moesim.config.loading import load_scenario
        from moesim.runner import simulate

        r = load_scenario(path, overrides or [])
        if r.scenario.workload.mode == "serve":
            from moesim.serving.run import simulate_serving

            return simulate_serving(r).summary
        return simulate(r).summary
    raise MoesimError(f"{path}: expected a scenario .yaml or a run folder")


def labels_for(summaries: list[dict[str, Any]]) -> list[str]:
    """Scenario names, numbered where one appears more than once."""
    names = [s["scenario"] for s in summaries]
    out = []
    for i, n in enumerate(names):
        out.append(n if names.count(n) == 1 else f"{n} #{names[: i + 1].count(n)}")
    return out


def summary_table(summaries: list[dict[str, Any]], labels: list[str]) -> pd.DataFrame:
    """One row per run, the :data:`COLUMNS` (:data:`SERVING_COLUMNS` for serving runs) plus
    the run's setting of each policy.

    Raises:
        MoesimError: serving runs and step runs mixed (their metrics differ).
    """
    kinds = {s.get("mode") == "serve" for s in summaries}
    if len(kinds) > 1:
        raise MoesimError("compare serving runs with serving runs, and step runs with step runs")
    columns = columns_for(summaries)
    rows = []
    for label, s in zip(labels, summaries, strict=True):
        row: dict[str, Any] = {"run": label, "scenario": s["scenario"]}
        pol = s.get("policies", {})
        row["placement"] = pol.get("placement", {}).get("type", "")
        cap = pol.get("capacity", {})
        row["capacity"] = (
            f"{cap.get('factor')} {cap.get('drop')}"
            if cap.get("type") == "capacity"
            else cap.get("type", "")
        )
        row["all_to_all"] = pol.get("all_to_all", {}).get("type", "")
        row.update({col: float(get(s)) for col, (_, get) in columns.items()})
        rows.append(row)
    return pd.DataFrame(rows)


def compare(
    entries: list[str | Path],
    overrides: list[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[pd.DataFrame, dict[str, dict[str, Any]]]:
    """Load or simulate every entry; the comparison table and the summaries by label."""
    summaries = []
    for i, e in enumerate(entries):
        summaries.append(load_entry(e, overrides))
        if progress:
            progress(i + 1, len(entries))
    labels = labels_for(summaries)
    return summary_table(summaries, labels), dict(zip(labels, summaries, strict=True))


def compare_figures(table: pd.DataFrame, summaries: dict[str, dict[str, Any]]) -> list[Any]:
    """Stacked step-time breakdown, the metric bars, and drops by position."""
    import plotly.graph_objects as go

    from moesim.metrics.collector import PHASES
    from moesim.results.report import COLORS, drops_by_position_figure

    labels = list(summaries)
    if "output_tok_s_per_gpu" in table.columns:  # serving runs: their metrics side by side
        return [_metric_bars(table, labels, SERVING_COLUMNS, "Serving metrics by run")]
    breakdown = go.Figure()
    for phase in PHASES:
        ms = [summaries[x]["breakdown_s"].get(phase, 0.0) * 1e3 for x in labels]
        if any(ms):
            breakdown.add_trace(go.Bar(name=phase, x=labels, y=ms, marker_color=COLORS[phase]))
    breakdown.update_layout(
        title="Time per step by phase (ms; summed over layers, mean over GPUs)",
        barmode="stack",
        yaxis_title="ms",
    )
    figs = [breakdown, _metric_bars(table, labels, COLUMNS, "Metrics by run")]
    drops = drops_by_position_figure(summaries)
    if drops is not None:
        figs.append(drops)
    return figs


def _metric_bars(
    table: pd.DataFrame,
    labels: list[str],
    columns: dict[str, tuple[str, Callable[[dict[str, Any]], float]]],
    title: str,
) -> Any:
    """One bar chart per metric column, the runs side by side (4 to a row)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    bars = make_subplots(rows=2, cols=4, subplot_titles=[header for header, _ in columns.values()])
    for i, (m, (header, _)) in enumerate(columns.items()):
        bars.add_trace(
            go.Bar(x=labels, y=table[m], name=header, showlegend=False),
            row=i // 4 + 1,
            col=i % 4 + 1,
        )
    bars.update_layout(title=title, height=700)
    return bars


def write_compare(
    table: pd.DataFrame, summaries: dict[str, dict[str, Any]], out_root: str | Path
) -> Path:
    """Write ``<out_root>/compare/<time>-<n>runs/`` (report.html, compare.csv, summaries.json)."""

    from moesim.results.report import headline_table, html_page
    from moesim.results.writer import write_folder

    def fill(tmp: Path) -> None:
        table.to_csv(tmp / "compare.csv", index=False)
        (tmp / "summaries.json").write_text(
            jsonout.dumps(summaries, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
        page = html_page(
            "moesim comparison",
            ", ".join(summaries),
            compare_figures(table, summaries),
            table.to_html(index=False, float_format=lambda v: f"{v:,.4g}"),
            head=headline_table(summaries) if "step_time_ms" in table.columns else "",
        )
        (tmp / "report.html").write_text(page, encoding="utf-8")

    return write_folder(Path(out_root) / "compare", f"{len(summaries)}runs", fill)
