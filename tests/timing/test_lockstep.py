"""The lockstep walk (moesim.timing.lockstep) gives the SimPy walk's results."""

from __future__ import annotations

import json

import pytest

from moesim.config.loading import load_scenario
from moesim.metrics.collector import Collector
from moesim.results.writer import summary_json
from moesim.routing.stage import RoutingStage
from moesim.runner import simulate
from moesim.timing.costs import scenario_costs
from moesim.timing.engine import Engine
from tests.conftest import SCENARIOS


def _differences(a: object, b: object, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = set(a) | set(b)
        return [
            d
            for k in sorted(keys)
            if k != "engine"
            for d in _differences(a.get(k), b.get(k), f"{path}.{k}")
        ]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [
            d
            for i, (u, v) in enumerate(zip(a, b, strict=True))
            for d in _differences(u, v, f"{path}[{i}]")
        ]
    if isinstance(a, float) and isinstance(b, float):
        return [] if a == pytest.approx(b, rel=1e-9, abs=1e-15) else [f"{path}: {a} != {b}"]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


@pytest.mark.parametrize(
    ("scenario", "sets"),
    [
        ("mixtral-8x7b-decode-8xh100.yaml", ["workload.steps=6"]),  # NVSwitch, direct
        ("quickstart.yaml", ["workload.steps=3"]),  # trace replay, capacity drops
        ("deepseek-v3-prefill-64xh800.yaml", ["workload.seq_len=1024"]),  # 8 nodes, dense layers
        # shared experts queued during the dispatch, on a compute stream of its own speed
        ("mixtral-8x7b-decode-8xh100.yaml", ["workload.steps=3", "policies.all_to_all.type=pxn"]),
    ],
)
def test_lockstep_summaries_are_the_simpy_ones(scenario: str, sets: list[str]) -> None:
    runs = {}
    for lock in ("true", "false"):
        r = load_scenario(SCENARIOS / scenario, [*sets, f"engine.lockstep={lock}"])
        res = simulate(r)
        runs[lock] = (json.loads(summary_json(res.summary)), res)
    (a, fast), (b, slow) = runs["true"], runs["false"]
    assert _differences(a, b) == []
    # the timeline holds the same spans (listed in another order)
    key = lambda e: (e["tid"], e["ts"], e["name"])  # noqa: E731
    assert sorted(map(key, fast.timeline)) == sorted(map(key, slow.timeline))


@pytest.mark.parametrize(
    ("scenario", "sets", "applies"),
    [
        ("mixtral-8x7b-decode-8xh100.yaml", [], True),
        ("deepseek-v3-decode-256xh800.yaml", [], True),
        ("olmoe-decode-8xl40s.yaml", [], False),  # PCIe switches: links shared by GPUs
        ("mixtral-8x7b-decode-8xh100.yaml", ["policies.overlap.micro_batches=2"], False),
        ("mixtral-8x7b-decode-8xh100.yaml", ["parallelism.ep=4", "parallelism.tp=2"], False),
        ("qwen3-moe-train-2x8xh100.yaml", [], False),
        ("mixtral-8x7b-offload-1xrtx4090.yaml", [], False),
    ],
)
def test_lockstep_runs_only_the_fixed_sequences(scenario: str, sets: list[str], applies: bool):
    r = load_scenario(SCENARIOS / scenario, sets)
    col = Collector(1, r.model.num_layers, r.world, r.model.moe_layers, r.gpus_per_node, 0)
    import numpy as np

    routing = RoutingStage(r.scenario, r.model, r.gpus_per_node, np.random.default_rng(0))
    assert Engine(r, routing, scenario_costs(r), col).lockstep_applies() is applies
