"""Counting: deduplication per destination rank and node, conservation, capacity drops."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.policies.capacity import get_capacity, keep_mask
from moesim.policies.placement import make_placement, simple_input
from moesim.policies.replicas import REPLICA_CHOICES
from moesim.routing.dispatch import CapacityRule, count_layers
from moesim.routing.sources import RoutingDraw, first_of_kind
from tests.conftest import ROOT


def _count(
    experts: np.ndarray,
    ranks: int,
    factor: float | None = None,
    rank_node: np.ndarray | None = None,
):
    layers, _, _, k = experts.shape
    num_experts = 8
    placement = make_placement("contiguous", simple_input(np.ones((layers, num_experts)), ranks))
    rule = CapacityRule(factor=factor, drop="position", num_experts=num_experts, top_k=k)
    nodes = rank_node if rank_node is not None else np.zeros(ranks, dtype=np.int64)
    chooser = REPLICA_CHOICES.get("round_robin")(placement, num_experts, nodes)
    return count_layers(
        RoutingDraw(experts, None), np.arange(layers), placement, chooser, rule, nodes
    )


def test_first_of_kind() -> None:
    x = np.array([[3, 3, 1, 3], [0, 1, 2, 1]])
    assert first_of_kind(x).tolist() == [[True, False, True, False], [True, True, True, False]]


def test_token_sent_once_per_destination_rank() -> None:
    # 4 ranks x 2 experts each; rank 0's only token picks experts 0 and 1 (both on rank 0)
    # and 2 (rank 1): one copy stays, one copy goes to rank 1, not two.
    experts = np.array([[[[0, 1, 2]], [[6, 7, 4]], [[2, 3, 5]], [[0, 2, 4]]]])
    c = _count(experts, ranks=4)
    assert c.rank_copies[0, 0].tolist() == [1, 1, 0, 0]
    assert c.rank_copies[0, 1].tolist() == [0, 0, 1, 1]
    assert c.rank_copies[0, 2].tolist() == [0, 1, 1, 0]
    assert c.rank_copies[0, 3].tolist() == [1, 1, 1, 0]


def test_node_dedup_counts_a_node_once() -> None:
    # 4 ranks on 2 nodes; rank 0's token reaches ranks 0, 1 (node 0) and 2 (node 1).
    experts = np.array([[[[0, 2, 4]], [[0, 1, 3]], [[6, 7, 5]], [[0, 6, 7]]]])
    c = _count(experts, ranks=4, rank_node=np.array([0, 0, 1, 1]))
    assert c.rank_copies[0, 0].tolist() == [1, 1, 1, 0]
    assert c.node_copies[0].tolist() == [[1, 1], [1, 0], [0, 1], [1, 1]]


def test_tokens_conserved_with_drops() -> None:
    rng = np.random.default_rng(0)
    experts = np.stack([np.stack([rng.permutation(8)[:2] for _ in range(64)]) for _ in range(4)])[
        None
    ]  # [1 layer, 4 ranks, 64 tokens, 2]
    experts[..., 0] = 0  # everyone wants expert 0 first
    c = _count(experts, ranks=4, factor=1.0)
    computed = c.slot_tokens.sum()
    assert computed + c.dropped.sum() == c.routed.sum() == 4 * 64 * 2
    assert c.dropped.sum() > 0
    cap = get_capacity(64, 2, 1.0, 8)
    # expert 0 (rank 0, slot 0) accepts at most `cap` from each of the 4 source ranks
    assert c.slot_tokens[0, 0, 0] == 4 * cap


def test_position_policy_keeps_earliest_tokens() -> None:
    experts = np.zeros((1, 1, 10, 1), dtype=np.int64)  # 10 tokens all to expert 0
    keep = keep_mask(experts, capacity=3, num_experts=8, policy="position")
    assert keep[0, 0, :, 0].tolist() == [True] * 3 + [False] * 7


def test_probs_policy_keeps_highest_gate_weights() -> None:
    experts = np.zeros((1, 1, 6, 1), dtype=np.int64)  # 6 tokens all to expert 0
    weights = np.array([0.1, 0.9, 0.3, 0.9, 0.2, 0.8]).reshape(1, 1, 6, 1)
    keep = keep_mask(experts, capacity=3, num_experts=8, policy="probs", weights=weights)
    # the three largest weights; of the two 0.9s neither is dropped, ties go to earlier tokens
    assert keep[0, 0, :, 0].tolist() == [False, True, False, True, False, True]
    keep = keep_mask(experts, capacity=1, num_experts=8, policy="probs", weights=weights)
    assert keep[0, 0, :, 0].tolist() == [False, True, False, False, False, False]


def test_capacity_formula_is_megatrons() -> None:
    assert get_capacity(4096, 8, 1.25, 256) == 160
    assert get_capacity(100, 2, 1.0, 8) == 25
    assert get_capacity(101, 2, 1.0, 8) == 26


def test_random_policy_keeps_a_seeded_random_subset() -> None:
    experts = np.zeros((1, 1, 20, 1), dtype=np.int64)
    a = keep_mask(experts, 5, 8, "random", rng=np.random.default_rng(1))
    b = keep_mask(experts, 5, 8, "random", rng=np.random.default_rng(1))
    c = keep_mask(experts, 5, 8, "random", rng=np.random.default_rng(2))
    assert a.sum() == 5 and (a == b).all() and (a != c).any()
    assert a[0, 0, :5, 0].tolist() != [True] * 5 or a[0, 0, 5:, 0].any()


def test_reroute_sends_drops_to_the_next_choice_with_room() -> None:
    from moesim.policies.capacity import reroute

    experts = np.zeros((1, 1, 4, 1), dtype=np.int64)  # 4 tokens all choose expert 0
    fallback = np.tile(np.array([1, 2, 3]), (1, 1, 4, 1))  # then 1, 2, 3
    keep = keep_mask(experts, 1, 4, "reroute")
    assert keep.sum() == 1
    ex, kept = reroute(experts, keep, fallback, capacity=1, num_experts=4)
    assert ex[0, 0, :, 0].tolist() == [0, 1, 2, 3] and kept.all()
    # depth 1: only the first next choice is tried, so two tokens stay dropped
    ex, kept = reroute(experts, keep, fallback[..., :1], capacity=1, num_experts=4)
    assert ex[0, 0, :, 0].tolist() == [0, 1, 0, 0] and kept.sum() == 2


def test_reroute_skips_experts_the_token_already_uses() -> None:
    from moesim.policies.capacity import reroute

    experts = np.array([[[[0, 1], [0, 2]]]])  # token 0: 0, 1; token 1: 0, 2
    keep = keep_mask(experts, 1, 4, "reroute")  # token 1 loses expert 0
    fallback = np.array([[[[1, 3], [2, 3]]]])  # token 1's next choice 2 is already its own
    ex, kept = reroute(experts, keep, fallback, capacity=1, num_experts=4)
    assert ex[0, 0, 1].tolist() == [3, 2] and kept.all()


def test_reroute_drops_fewer_than_position_in_the_stage() -> None:
    from moesim.config.loading import load_scenario
    from moesim.routing.stage import RoutingStage

    def drops(policy: str) -> tuple[int, int]:
        r = load_scenario(
            ROOT / "scenarios" / "olmoe-decode-8xl40s.yaml",
            [
                "routing.generator=zipf",
                "policies.capacity.type=capacity",
                "policies.capacity.factor=1.0",
                f"policies.capacity.drop={policy}",
            ],
        )
        stage = RoutingStage(r.scenario, r.model, r.gpus_per_node, np.random.default_rng(0))
        c = stage.step(0).replicas[0]
        assert c.slot_tokens.sum() + c.dropped.sum() == c.routed.sum()  # conservation
        return int(c.dropped.sum()), int(c.routed.sum())

    pos, routed = drops("position")
    rer, _ = drops("reroute")
    assert pos > 0.05 * routed
    assert rer < 0.8 * pos  # measured 16,090 vs 26,251 (seed 0)


def test_padding_counts_capacity_rows() -> None:
    experts = np.zeros((1, 2, 8, 1), dtype=np.int64)  # 2 ranks x 8 tokens, all to expert 0
    placement = make_placement("contiguous", simple_input(np.ones((1, 4)), 2))
    chooser = REPLICA_CHOICES.get("round_robin")(placement, 4, np.zeros(2, dtype=np.int64))
    rule = CapacityRule(factor=1.0, drop="position", num_experts=4, top_k=1, pad=True)
    c = count_layers(
        RoutingDraw(experts, None), np.arange(1), placement, chooser, rule, np.zeros(2, int)
    )
    cap = get_capacity(8, 1, 1.0, 4)  # 2 per rank
    # every expert computes cap rows from each of the 2 ranks; expert 0's are real tokens
    assert c.slot_tokens.tolist() == [[[2 * cap, 2 * cap], [2 * cap, 2 * cap]]]
    assert c.padding.sum() == 3 * 2 * cap
    # every rank sends cap rows to each expert: 2 experts per rank
    assert c.assignments[0].tolist() == [[2 * cap, 2 * cap], [2 * cap, 2 * cap]]


def test_global_scope_shares_capacity_across_ranks() -> None:
    experts = np.zeros((1, 2, 4, 1), dtype=np.int64)
    experts[0, 1] = 1  # rank 1's tokens go to expert 1
    experts[0, 0, 3] = 1
    per_rank = keep_mask(experts, 2, 2, "position", scope="rank")
    glob = keep_mask(experts, 4, 2, "position", scope="global")
    assert per_rank.sum() == 2 + 1 + 2  # rank 0: two of expert 0, one of 1; rank 1: two
    # global: expert 0 takes rank 0's 3 tokens; expert 1 takes rank 0's one then 3 of rank 1
    assert glob[0, 0, :, 0].all() and glob[0, 1, :, 0].tolist() == [True, True, True, False]


def test_reroute_follows_the_traces_router_logits(tmp_path) -> None:
    """With router logits in the trace, a dropped assignment goes to the token's next experts
    by logit; without them, to draws from the layer's popularity."""
    from moesim.config.loading import load_scenario
    from moesim.routing.stage import RoutingStage
    from moesim.traces.format import write_trace
    from tests.traces.conftest import make_trace

    tokens = 64
    experts = np.tile(np.array([0, 1]), (4, tokens, 1))  # every token picks experts 0 and 1
    logits = np.zeros((4 * tokens, 8), dtype=np.float32)
    logits[:, [0, 1]] = 9.0
    seq = np.arange(4 * tokens) % tokens // 16  # layer-major rows; sequences of 16 tokens
    even = seq % 2 == 0
    logits[even, 5], logits[even, 6] = 5.0, 4.0  # even sequences: next 5, then 6
    logits[~even, 7], logits[~even, 2] = 5.0, 4.0  # odd sequences: next 7, then 2

    def routed(**cols: np.ndarray) -> np.ndarray:
        path = write_trace(make_trace(experts, 8, seq_len=16, **cols), tmp_path / "t.parquet")
        r = load_scenario(
            ROOT / "scenarios" / "quickstart.yaml",
            [
                f"routing.path={path}",
                "routing.trace_steps=[0,0]",
                "policies.capacity.drop=reroute",
                "policies.capacity.factor=1.0",
                "policies.capacity.reroute_depth=2",
            ],
        )
        stage = RoutingStage(r.scenario, r.model, r.gpus_per_node, np.random.default_rng(0))
        c = stage.step(0).replicas[0]
        path.unlink()
        assert c.slot_tokens.sum() + c.dropped.sum() == c.routed.sum()
        return c.expert_routed.reshape(-1, 8).sum(axis=0)

    by_logit = routed(logits=logits)
    assert by_logit[[5, 7]].min() > 0 and by_logit[[2, 6]].min() > 0
    assert by_logit[[3, 4]].sum() == 0  # never among a token's next two by logit
    by_popularity = routed()
    assert by_popularity[[3, 4]].sum() > 0


@pytest.mark.parametrize("compiled", [True, False])
def test_counts_match_counting_by_hand(compiled: bool) -> None:
    """The one-pass compiled count (large chunks) and the numpy one (small chunks) against a
    plain loop over every assignment: dropped slots, slots without an expert, tokens reaching
    one rank or node through several slots."""
    from moesim.routing.dispatch import _count_compiled, count_routed_numpy

    count = _count_compiled if compiled else count_routed_numpy

    rng = np.random.default_rng(4)
    layers, ranks, tokens, k, per_rank, experts = 2, 4, 30, 3, 3, 12
    slot_rank = np.arange(ranks * per_rank) // per_rank
    rank_node = np.array([0, 0, 1, 1])
    slot = rng.integers(0, ranks * per_rank, size=(layers, ranks, tokens, k))
    expert = rng.integers(0, experts, size=slot.shape)
    valid = rng.random(slot.shape) < 0.9
    keep = valid & (rng.random(slot.shape) < 0.7)
    for kept in (keep, None):
        got = count(slot, kept, expert, valid, slot_rank, rank_node, experts)
        if kept is None:
            kept = np.ones(slot.shape, dtype=bool)
        want = [
            np.zeros((layers, ranks, ranks), int),
            np.zeros((layers, ranks * per_rank), int),
            np.zeros((layers, ranks, ranks), int),
            np.zeros((layers, ranks, 2), int),
            np.zeros((layers, experts), int),
        ]
        for li, r, t in np.ndindex(layers, ranks, tokens):
            to_ranks, to_nodes = set(), set()
            for j in range(k):
                if valid[li, r, t, j]:
                    want[4][li, expert[li, r, t, j]] += 1
                if kept[li, r, t, j]:
                    d = slot_rank[slot[li, r, t, j]]
                    want[0][li, r, d] += 1
                    want[1][li, slot[li, r, t, j]] += 1
                    to_ranks.add(d)
                    to_nodes.add(rank_node[d])
            for d in to_ranks:
                want[2][li, r, d] += 1
            for n in to_nodes:
                want[3][li, r, n] += 1
        for g, w in zip(got, want, strict=True):
            assert np.array_equal(g, w)


def test_compiled_count_looks_slots_up_as_reading_them() -> None:
    """With one replica per expert the compiled pass looks each slot up in the chooser's
    table (moesim.policies.replicas.TableChooser.slot_table) instead of reading the slots
    array: the same counts, for a chunk of later layers too."""
    from moesim.policies.placement import Placement
    from moesim.policies.replicas import REPLICA_CHOICES
    from moesim.routing.dispatch import _count_compiled

    rng = np.random.default_rng(5)
    moe_layers, experts, ranks, tokens, k = 5, 16, 4, 40, 3
    phy2log = np.stack([rng.permutation(experts) for _ in range(moe_layers)])
    placement = Placement(phy2log=phy2log, ranks=ranks)
    rank_node = np.array([0, 0, 1, 1])
    chooser = REPLICA_CHOICES.get("round_robin")(placement, experts, rank_node)
    table = chooser.slot_table()
    assert table is not None and table.shape == (moe_layers, experts)
    layers = np.array([2, 4])
    expert = rng.integers(0, experts, size=(layers.size, ranks, tokens, k))
    valid = np.ones(expert.shape, dtype=bool)
    keep = rng.random(expert.shape) < 0.8
    for kept in (keep, None):
        args = (kept, expert, valid, placement.slot_rank, rank_node, experts)
        read = _count_compiled(chooser.slots(layers, expert, kept), *args)
        looked_up = _count_compiled(np.empty((0, 0, 0, 0), np.int32), *args, (table, layers))
        for a, b in zip(read, looked_up, strict=True):
            assert np.array_equal(a, b)


@pytest.mark.parametrize("compiled", [True, False])
def test_counts_without_copies_leave_the_others_alone(compiled: bool) -> None:
    """An all-to-all that does not read the deduplicated counts (DeepEP's low-latency kernels)
    has them skipped: ``[L, 0, 0]``, the other counts the same."""
    from moesim.comm.alltoall import ALL_TO_ALL
    from moesim.routing.dispatch import _count_compiled, count_routed_numpy

    assert not ALL_TO_ALL.get("low_latency").reads_copies
    assert ALL_TO_ALL.get("hierarchical").reads_copies and ALL_TO_ALL.get("direct").reads_copies
    rng = np.random.default_rng(6)
    slot = rng.integers(0, 12, size=(2, 4, 30, 3))
    expert = rng.integers(0, 12, size=slot.shape)
    valid = np.ones(slot.shape, dtype=bool)
    args = (None, expert, valid, np.arange(12) // 3, np.array([0, 0, 1, 1]), 12)
    if compiled:
        full, lean = _count_compiled(slot, *args), _count_compiled(slot, *args, None, False)
    else:
        full, lean = count_routed_numpy(slot, *args), count_routed_numpy(slot, *args, False)
    for i in (0, 1, 4):
        assert np.array_equal(full[i], lean[i])
    assert lean[2].shape == lean[3].shape == (2, 0, 0)
