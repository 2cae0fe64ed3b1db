"""Reference workloads, timed. ``make bench`` runs them and writes benchmarks/results.json.

Each benchmark runs in its own process so that its peak memory (max RSS) is its own.

- B1: Mixtral-8x7B decode, 8x H100, EP8, batch 256, 200 steps
  (scenarios/mixtral-8x7b-decode-8xh100.yaml with workload.steps=200);
- B2: DeepSeek-V3 prefill, 64x H800, EP64, 4096 tokens per GPU, one step
  (scenarios/deepseek-v3-prefill-64xh800.yaml);
- B3: DeepSeek-V3 decode, 256x H800, EP256, 128 tokens per GPU, group-limited routing, DeepEP
  low-latency all-to-all, 20 steps (scenarios/deepseek-v3-decode-256xh800.yaml with
  workload.steps=20);
- B5: the same on 128 nodes, 1,024 GPUs as four EP256 replicas (dp 4), 5 steps.
- TR1: one DeepSeek-V3 training step at its published layout, 2,048 H800 as PP16 (DualPipe,
  120 micro-batches) x EP64 x DP2 (scenarios/deepseek-v3-train-2048xh800.yaml).
- SV1: serving 10,000 requests of DeepSeek-V3 on SGLang's PD layout, 4 prefill + 9 decode
  nodes of H100 (scenarios/deepseek-v3-serve-pd-13x8xh100.yaml; issue 19's target 60 s).

- T1: loading a routing trace of 20.97M token-expert assignments (16 layers x 163,840 tokens,
  64 experts, top-8, with gate weights) with ``moesim.traces.read_trace``.

Targets on a 2-core machine (issue 17): B1 <= 3 s, B2 <= 3 s, B3 <= 10 s, B5 <= 60 s (issue
18: TR1 <= 60 s), each within 2 GB of peak memory; T1 >= 10M assignments per second. A row
records whether it met them. ``make bench`` also runs B4 (one all-to-all phase on 1,024 GPUs,
benchmarks/b4.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = {
    "B1": ("scenarios/mixtral-8x7b-decode-8xh100.yaml", ["workload.steps=200"], 3.0),
    "B2": ("scenarios/deepseek-v3-prefill-64xh800.yaml", [], 3.0),
    "B3": ("scenarios/deepseek-v3-decode-256xh800.yaml", ["workload.steps=20"], 10.0),
    "B5": (
        "scenarios/deepseek-v3-decode-256xh800.yaml",
        ["cluster.nodes=128", "parallelism.dp=4", "workload.steps=5"],
        60.0,
    ),
    "TR1": ("scenarios/deepseek-v3-train-2048xh800.yaml", [], 60.0),
    "SV1": (
        "scenarios/deepseek-v3-serve-pd-13x8xh100.yaml",
        ["serving.requests.count=10000", "serving.requests.warmup=1000"],
        60.0,
    ),
}
MEMORY_TARGET_MB = 2048.0


TRACE_TARGET = 10e6  # assignments per second


def run_trace_load() -> dict[str, object]:
    """T1: write a 21M-assignment trace to a temporary file and time loading it (best of 3)."""
    import tempfile

    import numpy as np

    from moesim.traces.format import Trace, TraceMeta, read_trace

    layers, tokens, k, e = 16, 163_840, 8, 64
    rng = np.random.default_rng(0)
    rows = layers * tokens
    trace = Trace.from_layers(
        TraceMeta("benchmark", e, k, layers, "synthetic"),
        rng.integers(0, e, size=(layers, tokens, k)),
        seq_len=2048,
        weights=rng.random((rows, k), dtype=np.float32),
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = trace.write(Path(tmp) / "t.parquet")
        size = path.stat().st_size
        times = []
        for _ in range(3):
            start = time.perf_counter()
            read_trace(path)
            times.append(time.perf_counter() - start)
    wall = min(times)
    rate = trace.assignments / wall
    return {
        "benchmark": "T1",
        "assignments": trace.assignments,
        "file_mb": round(size / 1e6, 1),
        "wall_s": round(wall, 3),
        "assignments_per_s": round(rate),
        "target_assignments_per_s": TRACE_TARGET,
        "meets_target": rate >= TRACE_TARGET,
        "peak_memory_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def run_one(name: str) -> dict[str, object]:
    """Run benchmark ``name`` in this process and return its measurements."""
    if name == "T1":
        return run_trace_load()
    from moesim.config.loading import load_scenario
    from moesim.runner import simulate

    path, overrides, target = BENCHMARKS[name]
    resolved = load_scenario(ROOT / path, overrides)
    start = time.perf_counter()
    if resolved.scenario.workload.mode == "serve":
        from moesim.serving.run import simulate_serving

        served = simulate_serving(resolved)
        sv = served.summary["serving"]
        return _row(name, path, overrides, target, time.perf_counter() - start) | {
            "requests": sv["requests"],
            "engine_steps": sv["steps"],
            "steps_simulated": sv["steps_simulated"],
        }
    result = simulate(resolved)
    wall = time.perf_counter() - start
    return _row(name, path, overrides, target, wall) | {
        "simulated_events": result.events_processed,
        "simulated_step_time_s": result.summary["step_time_s"],
    }


def _peak_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _row(name: str, path: str, overrides: list[str], target: float, wall: float) -> dict[str, Any]:
    """The fields every benchmark row has: what ran, its wall time and peak memory, and
    whether they met the targets."""
    peak = _peak_mb()
    return {
        "benchmark": name,
        "scenario": path,
        "overrides": overrides,
        "wall_s": round(wall, 3),
        "target_s": target,
        "target_memory_mb": MEMORY_TARGET_MB,
        "meets_target": wall <= target and peak <= MEMORY_TARGET_MB,
        "peak_memory_mb": peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", help="run a single benchmark in this process, print JSON")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results.json")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one)))
        return
    rows = []
    for name in [*BENCHMARKS, "T1"]:
        row = in_own_process(__file__, "--one", name)
        rows.append(row)
        if name == "T1":
            print(
                f"T1: {row['assignments_per_s'] / 1e6:.1f}M assignments/s loading a trace "
                f"(target 10M/s), {row['wall_s']:.2f} s for {row['assignments']:,}"
            )
        elif name.startswith("SV"):
            print(
                f"{name}: {row['wall_s']:.2f} s (target {row['target_s']} s), "
                f"{row['requests']:,} requests, {row['engine_steps']:,} engine steps "
                f"({row['steps_simulated']} simulated), peak {row['peak_memory_mb']:.0f} MB"
            )
        else:
            print(
                f"{name}: {row['wall_s']:.2f} s (target {row['target_s']} s), "
                f"{row['simulated_events']:,} events, peak {row['peak_memory_mb']:.0f} MB"
                f"{'' if row['meets_target'] else '  MISSES ITS TARGET'}"
            )
    write_results(args.out, rows)
    print(f"wrote {args.out}")


def in_own_process(script: str, *args: str) -> dict[str, Any]:
    """Run ``script args`` in a new Python process (so that its peak memory is its own) and
    return the JSON object on the last line it prints."""
    proc = subprocess.run(
        [sys.executable, script, *args], capture_output=True, text=True, check=True, cwd=ROOT
    )
    row: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return row


def write_results(path: Path, rows: list[dict[str, object]]) -> None:
    """``rows`` as a results file: today's date, this machine, the rows."""
    out = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "results": rows,
    }
    path.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
