"""The recipes of ARCHITECTURE.md hold: a new policy of every family is one object in its
registry, and a scenario can name it at once; nothing else is edited. Each dummy counts its
calls, so the test fails if the simulator does not really use it."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml

from moesim.comm.alltoall import Exchange, Flows, algorithm, direct
from moesim.config.loading import load_scenario
from moesim.policies.capacity import DROP_POLICIES, DropPolicy
from moesim.policies.gating import GateContext, gate, top_indices
from moesim.policies.offload import CACHE_POLICIES, PREFETCHERS, CacheState, PrefetchInput
from moesim.policies.placement import PlacementInput, contiguous, placement
from moesim.policies.replicas import REPLICA_CHOICES, ReplicaChooser, round_robin
from moesim.routing.catalog import SOURCES
from moesim.routing.sources import SyntheticSource
from moesim.runner import simulate
from tests.conftest import SCENARIOS, small_scenario

calls: Counter[str] = Counter()


@pytest.fixture
def dummies(clean_registries: None) -> None:
    """One dummy policy of every family, registered through the public registries alone."""
    calls.clear()

    @algorithm("test-a2a")
    def a2a(ex: Exchange, token_bytes: float) -> Flows:
        calls["all-to-all"] += 1
        return direct(ex, token_bytes)

    @placement("test-placement")
    def place(inp: PlacementInput) -> np.ndarray:
        calls["placement"] += 1
        return contiguous(inp)

    @gate("test-gate")
    def top(scores: np.ndarray, ctx: GateContext) -> np.ndarray:
        calls["gating"] += 1
        return top_indices(scores, ctx.top_k)

    def latest_first(order: np.ndarray, weights: np.ndarray, rng: np.random.Generator):
        calls["drop policy"] += 1
        return -order

    DROP_POLICIES.register("test-drop")(DropPolicy(latest_first))

    @REPLICA_CHOICES.register("test-choice")
    def choice(p, num_experts: int, rank_node: np.ndarray) -> ReplicaChooser:
        calls["replica choice"] += 1
        return round_robin(p, num_experts, rank_node)

    @CACHE_POLICIES.register("test-cache")
    def evict_first(candidates: list[int], st: CacheState) -> int:
        calls["cache policy"] += 1
        return min(candidates)

    @PREFETCHERS.register("test-prefetch")
    def nothing(inp: PrefetchInput) -> list[list[int]]:
        calls["prefetch"] += 1
        return [[] for _ in inp.needed]

    @SOURCES.register("test-source")
    def source(cfg, model, rng) -> SyntheticSource:
        calls["routing source"] += 1
        return SyntheticSource(cfg, model, rng)


def _run(tmp_path: Path, scenario: dict) -> dict:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(scenario))
    return simulate(load_scenario(path)).summary


def test_a_dummy_of_every_family_runs_from_a_scenario(dummies: None, tmp_path: Path) -> None:
    summary = _run(
        tmp_path,
        small_scenario(
            **{
                "routing.source": "test-source",
                "policies.gating.type": "test-gate",
                "policies.capacity": {"type": "capacity", "factor": 1.0, "drop": "test-drop"},
                "policies.placement": {"type": "test-placement", "replica_choice": "test-choice"},
                "policies.all_to_all.type": "test-a2a",
            }
        ),
    )
    assert summary["step_time_s"] > 0
    offload = yaml.safe_load((SCENARIOS / "mixtral-8x7b-offload-1xrtx4090.yaml").read_text())
    offload["policies"]["offload"].update(policy="test-cache", prefetch="test-prefetch")
    offload["workload"]["steps"] = 2
    offload["routing"] = {"source": "synthetic", "generator": "zipf", "skew": 1.2}
    assert _run(tmp_path, offload)["offload"]["hit_rate"] > 0
    families = ("routing source", "gating", "drop policy", "placement", "replica choice")
    families += ("all-to-all", "cache policy", "prefetch")
    assert {f for f in families if calls[f]} == set(families), calls


def test_the_dummies_are_gone_after_the_test() -> None:
    load = pytest.raises(Exception, match="unknown all-to-all 'test-a2a'")
    with load:
        load_scenario(SCENARIOS / "quickstart.yaml", ["policies.all_to_all.type=test-a2a"])
