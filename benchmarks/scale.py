"""How wall time and memory grow with the cluster: ``make bench-scale``.

DeepSeek-V3 decode (the B3 setting: 128 tokens per GPU, context 4096, group-limited routing,
DeepEP low-latency all-to-all) and prefill (the B2 setting: one 4,096-token sequence per GPU,
top-8 routing, direct all-to-all) for one step at 8, 16, 64, 256 and 1,024 GPUs: EP over all
of them up to 256, then data-parallel replicas of EP256 (dp 4 at 1,024 GPUs, as B5), on H200
(141 GB) so that the model's weights and KV cache fit on 8 GPUs. Each point
runs in its own process so that its peak memory is its own. Writes benchmarks/scale.json and a
figure, benchmarks/scale.html (wall time against GPUs on log axes, with the line a cost
proportional to GPUs would follow from the smallest point).
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

from run import in_own_process, write_results  # benchmarks/run.py, beside this script

ROOT = Path(__file__).resolve().parents[1]
GPUS = (8, 16, 64, 256, 1024)
MODES = {
    "decode": ("scenarios/deepseek-v3-decode-256xh800.yaml", 128),  # tokens per GPU
    "prefill": ("scenarios/deepseek-v3-prefill-64xh800.yaml", 1),  # sequences per GPU
}


def overrides(mode: str, gpus: int) -> list[str]:
    """The settings that put ``mode`` on ``gpus`` GPUs, one step."""
    ep = min(gpus, 256)
    per_gpu = MODES[mode][1]
    return [
        "hardware=h200",
        f"cluster.nodes={gpus // 8}",
        f"parallelism.ep={ep}",
        f"parallelism.dp={gpus // ep}",
        f"workload.batch_size={per_gpu * ep}",
        "workload.steps=1",
    ]


def run_point(mode: str, gpus: int) -> dict[str, object]:
    """Simulate one point in this process and return its measurements."""
    from moesim.config.loading import load_scenario
    from moesim.runner import simulate

    over = overrides(mode, gpus)
    resolved = load_scenario(ROOT / MODES[mode][0], over)
    start = time.perf_counter()
    result = simulate(resolved)
    wall = time.perf_counter() - start
    return {
        "mode": mode,
        "gpus": gpus,
        "overrides": over,
        "wall_s": round(wall, 3),
        "peak_memory_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "simulated_events": result.events_processed,
        "simulated_step_time_s": result.summary["step_time_s"],
    }


def figure(rows: list[dict[str, object]], path: Path) -> None:
    """Wall time against GPUs, log-log, one line per mode plus its proportional-growth line."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for mode in MODES:
        pts = [r for r in rows if r["mode"] == mode]
        gpus = [r["gpus"] for r in pts]
        walls = [r["wall_s"] for r in pts]
        fig.add_scatter(x=gpus, y=walls, mode="lines+markers", name=f"{mode}: wall")
        base = float(walls[0]) / float(gpus[0])  # type: ignore[arg-type]
        fig.add_scatter(
            x=gpus,
            y=[base * float(g) for g in gpus],  # type: ignore[arg-type]
            mode="lines",
            line={"dash": "dot"},
            name=f"{mode}: proportional to GPUs",
        )
    fig.update_layout(
        title="moesim wall time for one DeepSeek-V3 step, by cluster size (2-core machine)",
        xaxis={"title": "GPUs", "type": "log", "tickvals": list(GPUS)},
        yaxis={"title": "wall time (s)", "type": "log", "tickformat": ".3~g"},
        template="plotly_white",
    )
    path.write_text(fig.to_html(include_plotlyjs=True, full_html=True), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", nargs=2, metavar=("MODE", "GPUS"), help="run one point")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "scale.json")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_point(args.one[0], int(args.one[1]))))
        return
    rows = []
    print(f"{'mode':8} {'GPUs':>6} {'wall s':>9} {'peak MB':>9} {'step ms':>9}")
    for mode in MODES:
        for gpus in GPUS:
            row = in_own_process(__file__, "--one", mode, str(gpus))
            rows.append(row)
            print(
                f"{mode:8} {gpus:>6} {row['wall_s']:>9.2f} {row['peak_memory_mb']:>9.0f} "
                f"{row['simulated_step_time_s'] * 1e3:>9.2f}",
                flush=True,
            )
    write_results(args.out, rows)
    html = args.out.with_suffix(".html")
    figure(rows, html)
    print(f"wrote {args.out} and {html}")


if __name__ == "__main__":
    main()
