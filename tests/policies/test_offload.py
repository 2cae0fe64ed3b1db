"""Expert offload: cache policies (Belady bounds LRU and LFU), prefetchers, the single-GPU case."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.config.loading import load_scenario
from moesim.errors import CapacityError
from moesim.policies.offload import (
    PREFETCHERS,
    PrefetchInput,
    affinity_prefetch,
    simulate_cache,
)
from moesim.runner import simulate
from tests.conftest import SCENARIOS


def _trace(seed: int, t: int = 400, items: int = 24, k: int = 2) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    pop = rng.dirichlet(np.full(items, 0.3))
    return [sorted(rng.choice(items, size=k, replace=False, p=pop).tolist()) for _ in range(t)]


def test_lru_on_a_known_sequence() -> None:
    needed = [[0], [1], [2], [0], [3], [0], [1]]
    run = simulate_cache(needed, [[]] * 7, capacity=2, policy="lru")
    # 0 1 2(evicts 0) 0(miss, evicts 1) 3(evicts 2) 0(hit) 1(miss)
    assert run.hits.tolist() == [0, 0, 0, 0, 0, 1, 0]
    assert run.demand.sum() == 6


def test_belady_on_a_known_sequence() -> None:
    needed = [[0], [1], [2], [0], [3], [0], [1]]
    run = simulate_cache(needed, [[]] * 7, capacity=2, policy="belady")
    # at 2: keep 0 (next at 3), evict 1 (next at 6); at 4: evict 2 (never again)
    assert run.hits.tolist() == [0, 0, 0, 1, 0, 1, 0]


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("capacity", [3, 6, 12])
def test_belady_bounds_lru_and_lfu(seed: int, capacity: int) -> None:
    needed = _trace(seed)
    none: list[list[int]] = [[] for _ in needed]
    hits = {
        p: simulate_cache(needed, none, capacity, p).hits.sum() for p in ("lru", "lfu", "belady")
    }
    assert hits["belady"] >= hits["lru"] and hits["belady"] >= hits["lfu"]


def test_oracle_prefetch_turns_misses_into_hits() -> None:
    needed = _trace(3)
    oracle = [needed[t + 1] if t + 1 < len(needed) else [] for t in range(len(needed))]
    base = simulate_cache(needed, [[] for _ in needed], 6, "lru")
    pre = simulate_cache(needed, oracle, 6, "lru")
    assert pre.hits[1:].sum() == sum(len(x) for x in needed[1:])  # every later need is a hit
    assert base.hits.sum() < pre.hits.sum()
    assert all(all(u) for u in pre.prefetch_used[:-1])


def test_cache_smaller_than_one_layer_is_an_error() -> None:
    with pytest.raises(CapacityError, match="cache_experts"):
        simulate_cache([[0, 1, 2]], [[]], capacity=2, policy="lru")


def test_affinity_prefetch_follows_the_transition() -> None:
    # 4 experts, top-1: expert 0 is always followed by 2, expert 1 by 3
    transition = np.zeros((4, 4))
    transition[0, 2] = transition[1, 3] = 1.0
    transition[2:, :] = 0.25
    loads = np.array([5.0, 0.0, 0.0, 0.0])
    assert affinity_prefetch(loads, transition, np.array([3, 2])) == [1]  # slot 1 holds 2


def test_single_gpu_offload_scenario_runs_where_nothing_else_fits() -> None:
    path = SCENARIOS / "mixtral-8x7b-offload-1xrtx4090.yaml"
    with pytest.raises(CapacityError, match="HBM"):
        simulate(load_scenario(path, ["policies.offload.type=none"]))
    runs = {
        p: simulate(load_scenario(path, [f"policies.offload.policy={p}", "workload.steps=8"]))
        for p in ("lru", "belady")
    }
    for res in runs.values():
        s = res.summary
        assert s["hbm_peak_bytes"] <= s["hbm_capacity_bytes"]
        off = s["offload"]
        assert off["stall_s"] > 0 and off["pcie_bytes_per_step"] > 0
        assert s["breakdown_s"]["offload_wait"] == pytest.approx(off["stall_s"])
        # a copy is expert bytes over the PCIe rate: the stall cannot beat the demand copies
        r = res.resolved
        copy_s = r.model.expert_params * 2 / (r.hardware.node.pcie_gb_per_s * 1e9)
        assert s["step_time_s"] >= off["demand_copies_per_step"] * copy_s
    lru, bel = runs["lru"].summary["offload"], runs["belady"].summary["offload"]
    assert bel["hit_rate"] >= lru["hit_rate"]
    assert runs["belady"].summary["step_time_s"] <= runs["lru"].summary["step_time_s"]


def test_offload_is_for_inference(write_scenario) -> None:
    from moesim.errors import ConfigErrors
    from tests.conftest import small_scenario

    data = small_scenario(
        **{
            "workload": {"mode": "train", "batch_size": 8, "seq_len": 128},
            "policies.offload": {"type": "cache", "cache_experts": 64},
        }
    )
    with pytest.raises(ConfigErrors, match="inference"):
        load_scenario(write_scenario(data))


def test_without_admission_the_cache_holds_the_most_used_items() -> None:
    needed = [[0, 1], [2, 0], [0, 3], [2, 4]]  # uses: 0 x3, 2 x2, then 1, 3, 4 once
    run = simulate_cache(needed, [[] for _ in needed], capacity=2, policy="lru", admit=False)
    assert run.missed == [[1], [], [3], [4]]
    assert run.hits.tolist() == [1, 2, 1, 1]
    assert run.demand.sum() == 0  # nothing is copied on a miss
    # prefetches still fill (and evict from) the cache
    pre = simulate_cache(needed, [[3], [], [], []], capacity=2, policy="lru", admit=False)
    assert pre.missed == [[1], [2], [], [2, 4]]  # 3 replaced 2 (the only unprotected item)
    assert pre.prefetch_used[0] == [False]  # fetched at t=0, not needed until t=2


def test_cpu_execution_of_missed_experts_beats_copying_them() -> None:
    # Fiddler's case: a decode token reads a 352 MB expert from host DRAM faster than it
    # copies the expert over PCIe Gen4
    path = SCENARIOS / "mixtral-8x7b-offload-1xrtx4090.yaml"
    runs = {
        m: simulate(load_scenario(path, [f"policies.offload.miss={m}", "workload.steps=4"]))
        for m in ("copy", "cpu")
    }
    cpu, copy = runs["cpu"].summary, runs["copy"].summary
    off = cpu["offload"]
    assert off["demand_copies_per_step"] == 0 and off["cpu_experts_per_step"] > 0
    r = runs["cpu"].resolved
    node, m = r.hardware.node, r.model
    # each missed expert streams its weights from host memory once
    per_expert = m.expert_params * 2 / (node.host_memory_gb_per_s * 1e9)
    assert off["cpu_s_per_step"] >= off["cpu_experts_per_step"] * per_expert
    # only tokens cross PCIe: one token (batch 1) to the host and back per missed expert
    token = 2 * m.hidden_size * 2
    assert off["pcie_bytes_per_step"] == pytest.approx(off["cpu_experts_per_step"] * token)
    assert off["stall_s"] > 0
    assert cpu["breakdown_s"]["offload_wait"] == pytest.approx(off["stall_s"])
    assert cpu["step_time_s"] < copy["step_time_s"]
    assert cpu["step_time_s"] >= off["cpu_s_per_step"]  # one CPU, one token: serial


def test_cpu_execution_needs_host_figures(write_scenario) -> None:
    from moesim.errors import ConfigErrors
    from tests.conftest import small_scenario

    data = small_scenario(
        **{"policies.offload": {"type": "cache", "cache_experts": 64, "miss": "cpu"}}
    )
    with pytest.raises(ConfigErrors, match=r"node\.host_memory_gb_per_s or node\.host_tflops"):
        load_scenario(write_scenario(data))


def test_replacement_makes_a_ranks_new_experts_cache_misses() -> None:
    """Offload with re-placement: cache items are (layer, logical expert), so an expert a rank
    gains at a re-placement is copied from host memory when first used (nothing moves over
    the network), even in a cache large enough to never evict."""
    import simpy

    from moesim.routing.stage import RoutingStage
    from moesim.timing.offload import OffloadTiming

    over = [
        "routing.generator=zipf",
        "policies.placement.type=eplb",
        "policies.placement.redundant_experts=8",
        "policies.placement.rebalance_every_steps=1",
        "policies.offload.type=cache",
        "policies.offload.cache_experts=1000",
        "workload.steps=4",
    ]
    r = load_scenario(SCENARIOS / "olmoe-decode-8xl40s.yaml", over)
    stage = RoutingStage(r.scenario, r.model, r.gpus_per_node, np.random.default_rng(0))
    routings = [stage.step(s) for s in range(4)]
    assert all(sr.migration is None for sr in routings)
    ep, spr, n_moe, n_exp = 8, stage.slots_per_rank, len(r.model.moe_layers), 64
    timing = OffloadTiming(
        r, stage, routings, np.zeros(ep, dtype=int), np.arange(ep), simpy.Environment()
    )
    new_after_first = 0
    for rk in range(ep):
        seen: set[int] = set()
        expected = []
        for step, sr in enumerate(routings):
            assert sr.placement is not None
            p2l = sr.placement.phy2log[:, rk * spr : (rk + 1) * spr]
            for m in range(n_moe):
                used = np.nonzero(sr.replicas[0].slot_tokens[m, rk])[0]
                items = {m * n_exp + int(p2l[m, s]) for s in used}
                expected.append(len(items - seen))
                new_after_first += len(items - seen) if step else 0
                seen |= items
        assert timing.runs[(0, rk)].demand.tolist() == expected
    assert new_after_first > 0  # the re-placements gave ranks experts they had not held
    res = simulate(load_scenario(SCENARIOS / "olmoe-decode-8xl40s.yaml", over))
    assert res.summary["migration_bytes"] == 0.0
    assert res.summary["offload"]["demand_copies_per_step"] > 0


@pytest.mark.parametrize("name", PREFETCHERS.names())
def test_every_prefetcher_names_next_layer_experts_only(name: str) -> None:
    rng = np.random.default_rng(0)
    moe, e, steps = 3, 8, 2
    needed = [
        sorted({(t % moe) * e + int(x) for x in rng.integers(0, e, 3)}) for t in range(moe * steps)
    ]
    maps = [np.tile(np.arange(e), (moe, 1)) for _ in needed]
    loads = [rng.integers(0, 20, e) for _ in needed]
    transition = np.full((moe - 1, e, e), 2.0 / e)
    inp = PrefetchInput(needed, loads, maps, moe, e, lambda: transition)
    out = PREFETCHERS.get(name)(inp)
    assert len(out) == len(needed)
    for t, items in enumerate(out):
        assert len(set(items)) == len(items)
        assert all(i // e == (t + 1) % moe for i in items), "items of the next access's layer"
    if name == "oracle":
        assert out[:-1] == needed[1:]
