"""B4: one direct all-to-all phase on 1,024 GPUs (128 DGX H100 nodes, rail-optimised fabric)
with a non-uniform per-pair byte matrix, through the flow network. Target (issue 4): < 2 s.

Usage: python benchmarks/b4_alltoall.py [--nodes 128] [--out benchmarks/b4.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import UTC, datetime

import numpy as np
import simpy

from moesim.comm.alltoall import Exchange, direct
from moesim.hardware.catalog import load_profile
from moesim.hardware.topology import Topology
from moesim.timing.network import FlowNetwork

TARGET_S = 2.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--nodes", type=int, default=128)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    n = args.nodes * 8
    rng = np.random.default_rng(0)
    # tokens per (src, dst) pair: Poisson around gamma-distributed means (skewed pairs)
    copies = rng.poisson(rng.gamma(1.0, 4.0, size=(n, n))).astype(float)
    gpus = np.arange(n)
    ex = Exchange(copies, np.zeros((n, 1), dtype=int), gpus, np.zeros(n, dtype=int), copies, 0)
    flows = direct(ex, 14336.0)
    t0 = time.perf_counter()
    topo = Topology(load_profile("h100-sxm"), args.nodes)
    env = simpy.Environment()
    net = FlowNetwork(env, topo, 0.1)
    done = np.full(n, np.nan)
    net.transfer(flows, gpus, lambda g, t: done.__setitem__(g, t))
    env.run()
    wall = time.perf_counter() - t0
    row = {
        "benchmark": "B4",
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version()},
        "gpus": n,
        "flows": int(flows.src.size),
        "wall_s": round(wall, 2),
        "target_s": TARGET_S,
        "meets_target": wall < TARGET_S,
        "simulated_phase_s": float(np.nanmax(done)),
    }
    print(json.dumps(row, indent=1))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(row, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
