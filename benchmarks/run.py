"""Reference workloads, timed. ``make bench`` runs them and writes benchmarks/results.json.

Each benchmark runs in its own process so that its peak memory (max RSS) is its own.

- B1: Mixtral-8x7B decode, 8x H100, EP8, batch 256, 200 steps
  (scenarios/mixtral-8x7b-decode-8xh100.yaml with workload.steps=200);
- B2: DeepSeek-V3 prefill, 64x H800, EP64, 4096 tokens per GPU, one step
  (scenarios/deepseek-v3-prefill-64xh800.yaml).

Targets on a 2-core machine: B1 <= 10 s, B2 <= 10 s (ambition: 3 s each).
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

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = {
    "B1": ("scenarios/mixtral-8x7b-decode-8xh100.yaml", ["workload.steps=200"], 10.0),
    "B2": ("scenarios/deepseek-v3-prefill-64xh800.yaml", [], 10.0),
}


def run_one(name: str) -> dict[str, object]:
    """Run benchmark ``name`` in this process and return its measurements."""
    from moesim.config.loading import load_scenario
    from moesim.runner import simulate

    path, overrides, target = BENCHMARKS[name]
    resolved = load_scenario(ROOT / path, overrides)
    start = time.perf_counter()
    result = simulate(resolved)
    wall = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "benchmark": name,
        "scenario": path,
        "overrides": overrides,
        "wall_s": round(wall, 3),
        "target_s": target,
        "meets_target": wall <= target,
        "simulated_events": result.events_processed,
        "peak_memory_mb": round(peak_kb / 1024, 1),
        "simulated_step_time_s": result.summary["step_time_s"],
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
    for name in BENCHMARKS:
        proc = subprocess.run(
            [sys.executable, __file__, "--one", name],
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
        )
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(
            f"{name}: {row['wall_s']:.2f} s (target {row['target_s']} s), "
            f"{row['simulated_events']:,} events, peak {row['peak_memory_mb']:.0f} MB"
        )
    out = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "results": rows,
    }
    args.out.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
