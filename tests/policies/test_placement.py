"""Placement policies: invariants of every policy, EPLB's published example, replica choice."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.errors import MoesimError
from moesim.policies.eplb import balanced_packing, rebalance
from moesim.policies.placement import (
    PLACEMENTS,
    PlacementInput,
    make_placement,
    placement,
    simple_input,
)
from moesim.policies.replicas import REPLICA_CHOICES

# deepseek-ai/EPLB README (../shared/validation/published.md section 2)
EPLB_WEIGHT = np.array(
    [
        [90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
        [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27],
    ]
)
EPLB_PHY2LOG = np.array(
    [
        [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
        [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1],
    ]
)


def _coactivation(layers: int, e: int, seed: int = 0):
    """Two cliques of co-chosen experts per layer: {0..e/2-1} together, the rest together,
    interleaved so that contiguous placement splits every clique."""
    co = np.zeros((layers, e, e))
    group = np.arange(e) % 2
    co[:, group[:, None] == group[None, :]] = 10.0
    co += np.random.default_rng(seed).random((layers, e, e))
    nxt = np.zeros((max(layers - 1, 0), e, e))
    for i in range(e):
        nxt[:, i, (i + 1) % e] = 5.0  # expert i is followed by expert i+1 at the next layer
    return lambda: (co, nxt)


def _input(loads, ranks, redundant=0, nodes=1, groups=1, coact=None) -> PlacementInput:
    e = loads.shape[1]
    return PlacementInput(
        loads=np.asarray(loads, dtype=np.float64),
        ranks=ranks,
        slots_per_rank=(e + redundant) // ranks,
        rank_node=np.arange(ranks) // (ranks // nodes),
        num_groups=groups,
        coactivation=coact,
    )


def test_eplb_reproduces_the_published_example_exactly() -> None:
    phy2log = rebalance(EPLB_WEIGHT, num_physical=16, num_groups=4, num_nodes=2, num_gpus=8)
    assert phy2log.tolist() == EPLB_PHY2LOG.tolist()
    # and through the registry, from a scenario-like input (2 nodes of 4 GPUs, 4 groups)
    p = make_placement("eplb", _input(EPLB_WEIGHT, 8, redundant=4, nodes=2, groups=4))
    assert p.phy2log.tolist() == EPLB_PHY2LOG.tolist()


def test_eplb_global_when_nodes_do_not_divide_groups() -> None:
    auto = rebalance(EPLB_WEIGHT, 16, num_groups=3, num_nodes=2, num_gpus=8)
    glob = rebalance(EPLB_WEIGHT, 16, num_groups=1, num_nodes=1, num_gpus=8)
    assert auto.tolist() == glob.tolist()
    p = make_placement("eplb_global", _input(EPLB_WEIGHT, 8, redundant=4, nodes=2, groups=4))
    assert p.phy2log.tolist() == glob.tolist()


def test_eplb_replicates_the_hottest_expert() -> None:
    loads = np.array([[100.0, 1, 1, 1, 1, 1, 1, 1]])
    p = make_placement("eplb_global", _input(loads, 4, redundant=4))
    cnt = p.logcnt(8)[0]
    assert cnt[0] == 5 and (cnt[1:] == 1).all()
    # its replicas are on distinct ranks, spreading its load
    ranks_of_0 = p.slot_rank[p.phy2log[0] == 0]
    assert len(set(ranks_of_0.tolist())) == 4


def test_balanced_packing_is_lpt() -> None:
    pack, rank = balanced_packing(np.array([[5.0, 4, 3, 3, 2, 1]]), 2)
    loads = np.bincount(pack[0], weights=[5, 4, 3, 3, 2, 1])
    assert loads.tolist() == [9.0, 9.0]
    assert sorted(rank[0][pack[0] == 0].tolist()) == [0, 1, 2]


@pytest.mark.parametrize("name", PLACEMENTS.names())
@pytest.mark.parametrize("nodes", [1, 2])
def test_every_policy_keeps_the_invariants(name: str, nodes: int) -> None:
    rng = np.random.default_rng(1)
    layers, e, ranks = 3, 16, 4
    loads = rng.dirichlet(np.full(e, 0.5), size=layers)
    redundant = 4 if PLACEMENTS.get(name).replicas else 0
    inp = _input(loads, ranks, redundant, nodes, groups=4, coact=_coactivation(layers, e))
    p = make_placement(name, inp)
    assert p.phy2log.shape == (layers, e + redundant)
    cnt = p.logcnt(e)
    assert (cnt >= 1).all(), "every expert has a replica"
    assert (cnt.sum(axis=1) == e + redundant).all(), "slots add up"
    assert (np.bincount(p.slot_rank) == (e + redundant) // ranks).all(), "equal slots per rank"
    log2phy = p.log2phy(e)
    for layer in range(layers):
        for x in range(e):
            slots = log2phy[layer, x][log2phy[layer, x] >= 0]
            assert (p.phy2log[layer, slots] == x).all()


def test_round_robin_layout() -> None:
    p = make_placement("round_robin", simple_input(np.ones((1, 8)), 4))
    assert [p.phy2log[0][p.slot_rank == r].tolist() for r in range(4)] == [
        [0, 4],
        [1, 5],
        [2, 6],
        [3, 7],
    ]


def test_greedy_balances_better_than_contiguous() -> None:
    loads = np.array([[8.0, 7, 6, 5, 4, 3, 2, 1]])

    def worst(name: str) -> float:
        p = make_placement(name, simple_input(loads, 4))
        per_rank = np.bincount(p.slot_rank, weights=loads[0][p.phy2log[0]])
        return float(per_rank.max())

    assert worst("contiguous") == 15.0
    assert worst("greedy") == 9.0


def test_graph_keeps_coactivated_experts_together() -> None:
    e, ranks = 8, 2
    inp = _input(np.ones((2, e)), ranks, coact=_coactivation(2, e))
    p = make_placement("graph", inp)
    for layer in range(2):
        on_rank = [set(p.phy2log[layer][p.slot_rank == r].tolist()) for r in range(ranks)]
        assert sorted(map(sorted, on_rank)) == [[0, 2, 4, 6], [1, 3, 5, 7]]
    # consecutive layers: expert i is followed by i+1, so layer 1's odd experts sit where
    # layer 0's even experts are
    r0 = p.slot_rank[np.argsort(p.phy2log[0])]
    r1 = p.slot_rank[np.argsort(p.phy2log[1])]
    assert r1[1] == r0[0]


def test_topology_aware_replicates_remote_hot_experts_per_node() -> None:
    e, ranks = 8, 4
    loads = np.array([[40.0, 1, 1, 1, 30, 1, 1, 1]])
    inp = _input(loads, ranks, redundant=4, nodes=2, coact=_coactivation(1, e))
    p = make_placement("topology_aware", inp)
    node_of_slot = p.slot_rank // 2
    for node in range(2):
        held = set(p.phy2log[0][node_of_slot == node].tolist())
        assert {0, 4} <= held, "both hot experts are on every node"


def test_policies_without_replicas_refuse_redundant_slots() -> None:
    with pytest.raises(ValueError, match="redundant_experts needs eplb or eplb_global or topol"):
        make_placement("contiguous", simple_input(np.ones((1, 8)), 4, redundant=4))


def test_contiguous_needs_divisible_experts() -> None:
    with pytest.raises(ValueError, match="divide"):
        make_placement("contiguous", _input(np.ones((1, 10)), 4))


def test_unknown_placement_lists_valid_names() -> None:
    with pytest.raises(MoesimError, match="valid: contiguous"):
        PLACEMENTS.get("eplbx")


def test_broken_policy_is_caught(clean_registries: None) -> None:
    @placement("test-broken")
    def broken(inp: PlacementInput) -> np.ndarray:
        return np.zeros_like(inp.loads, dtype=np.int64)  # every slot holds expert 0

    with pytest.raises(ValueError, match="without a slot"):
        make_placement("test-broken", simple_input(np.ones((1, 8)), 2))


# --- replica choice ---------------------------------------------------------------------


def _replicated():
    """8 experts on 4 ranks (2 nodes) with expert 0 on every rank."""
    phy2log = np.array([[0, 1, 2, 0, 3, 4, 0, 5, 6, 0, 7, 0]])[:, :12]
    from moesim.policies.placement import Placement

    return Placement(phy2log=phy2log, ranks=4), np.array([0, 0, 1, 1])


def test_nearest_uses_the_local_replica() -> None:
    p, nodes = _replicated()
    chooser = REPLICA_CHOICES.get("nearest")(p, 8, nodes)
    experts = np.zeros((1, 4, 5, 1), dtype=np.int64)  # every token of every rank picks 0
    slots = chooser.slots(np.arange(1), experts, None)
    assert (p.slot_rank[slots[0, :, :, 0]] == np.arange(4)[:, None]).all()


def test_round_robin_spreads_over_replicas() -> None:
    p, nodes = _replicated()
    chooser = REPLICA_CHOICES.get("round_robin")(p, 8, nodes)
    experts = np.zeros((1, 1, 8, 1), dtype=np.int64)
    slots = chooser.slots(np.arange(1), experts, None)
    assert np.bincount(p.slot_rank[slots.ravel()], minlength=4).tolist() == [2, 2, 2, 2]


def test_least_loaded_evens_out_the_ranks() -> None:
    p, nodes = _replicated()
    chooser = REPLICA_CHOICES.get("least_loaded")(p, 8, nodes)
    # rank 0 also holds experts 1, 2 which get 6 tokens each; expert 0 gets 12 tokens
    experts = np.array([0] * 12 + [1] * 6 + [2] * 6).reshape(1, 1, -1, 1)
    slots = chooser.slots(np.arange(1), experts, None)
    per_rank = np.bincount(p.slot_rank[slots.ravel()], minlength=4)
    assert per_rank.sum() == 24
    assert per_rank.tolist() == [12, 4, 4, 4]
