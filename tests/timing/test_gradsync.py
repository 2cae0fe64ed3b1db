"""Data-parallel gradient synchronisation and the optimizer step (moesim.timing.gradsync)."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.config.loading import load_scenario
from moesim.runner import simulate
from moesim.timing import gradsync
from moesim.timing.memory import hbm_usage
from tests.conftest import SCENARIOS

BASE = SCENARIOS / "mixtral-8x7b-decode-8xh100.yaml"
TRAIN = [
    "model=olmoe-1b-7b",
    "parallelism.ep=4",
    "parallelism.dp=2",
    "workload.mode=train",
    "workload.batch_size=8",
    "workload.seq_len=256",
    "workload.steps=1",
]


def _r(*sets: str):
    return load_scenario(BASE, [*TRAIN, *sets])


def test_buckets_hold_every_parameter_in_backward_order() -> None:
    r = _r("policies.optimizer.bucket_params=100000000")
    m = r.model
    dense, expert = gradsync.layer_params(r)
    assert dense.sum() == m.non_expert_params()
    assert expert.sum() == len(m.moe_layers) * r.slots_per_rank * m.expert_params
    bs = gradsync.buckets(r)
    for kind, per_layer in zip(gradsync.KINDS, (dense, expert), strict=True):
        mine = [b for b in bs if b.kind == kind]
        assert sum(b.params for b in mine) == pytest.approx(per_layer.sum())
        assert [b.layer for b in mine] == sorted((b.layer for b in mine), reverse=True)
        assert mine[-1].layer == 0 and all(b.params >= 1e8 for b in mine[:-1])
    assert gradsync.group_sizes(r) == {"dense": 8, "expert": 2}


def test_groups_follow_the_layout() -> None:
    rank = np.array([0, 1, 2, 3, 0, 1, 2, 3])  # ep 4 x dp 2, tp 1
    tp_rank = np.zeros(8, dtype=int)
    assert gradsync.group_of("dense", 5, rank, tp_rank).tolist() == list(range(8))
    assert gradsync.group_of("expert", 5, rank, tp_rank).tolist() == [1, 5]


@pytest.mark.parametrize("zero", [0, 1])
def test_the_ring_moves_the_bytes_worked_out_by_hand(zero: int) -> None:
    """All-reduce: each of n GPUs sends 2 (n-1)/n of its gradient bytes; ZeRO: (n-1)/n to
    reduce-scatter the gradients and (n-1)/n of the weights to gather them; bf16 both."""
    r = _r(f"policies.optimizer.zero={zero}")
    m = r.model
    dense = m.non_expert_params() * 2.0
    expert = len(m.moe_layers) * r.slots_per_rank * m.expert_params * 2.0
    # one dense group of 8, four expert groups of 2; every GPU of a group sends its share
    by_hand = 8 * 2 * (7 / 8) * dense + 4 * 2 * 2 * (1 / 2) * expert
    dp = simulate(r).summary["data_parallel"]
    assert dp["bytes_inter_node"] == 0  # one node
    assert dp["bytes_intra_node"] == pytest.approx(by_hand, rel=1e-9)


def test_overlap_hides_reductions_behind_the_backward_pass() -> None:
    on = simulate(_r("policies.optimizer.bucket_params=20000000")).summary
    off = simulate(
        _r(
            "policies.optimizer.bucket_params=20000000",
            "policies.optimizer.overlap_grad_reduce=false",
        )
    ).summary
    assert on["breakdown_s"]["dp_comm"] > 0 and on["data_parallel"]["buckets"] > 2
    assert on["step_time_s"] < off["step_time_s"]
    assert on["breakdown_s"]["exposed_comm"] < off["breakdown_s"]["exposed_comm"]


def test_optimizer_step_and_state_are_sharded_by_zero() -> None:
    """Adam reads and writes 24 + 2 + 2 bytes per parameter of the shard; ZeRO-1 keeps 12 bytes
    of state per parameter over the group, ZeRO-2 the gradients too."""
    m = _r().model
    for zero in (0, 1, 2):
        r = _r(f"policies.optimizer.zero={zero}")
        dense = m.non_expert_params()
        expert = len(m.moe_layers) * r.slots_per_rank * m.expert_params
        share = (dense / 8 + expert / 2) if zero else (dense + expert)
        gpu = r.hardware.gpu
        seconds = share * 28 / (gpu.hbm_bandwidth_gb_per_s * 1e9 * gpu.memory_efficiency)
        assert gradsync.optimizer_seconds(r) == pytest.approx(seconds)
        grads = 2 * (share if zero == 2 else dense + expert)
        assert hbm_usage(r, r.slots_per_rank).optimizer == pytest.approx(12 * share + grads)


def test_rings_between_nodes_use_every_nic() -> None:
    """16 GPUs on 2 nodes: 8 rings, each crossing between the nodes on its own GPUs, so all 8
    NICs of each node carry the inter-node hops; every GPU still sends its bytes once."""
    group = np.arange(16)
    flows = gradsync.ring(group, 800.0, 8)
    assert flows.src.size == 8 * 16
    sent = np.bincount(flows.src, weights=flows.nbytes)
    assert np.allclose(sent, 800.0)
    cross = flows.src // 8 != flows.dst // 8
    assert sorted(set(flows.src[cross].tolist())) == list(range(16))
    one = gradsync.ring(np.array([3, 11]), 800.0, 8)  # one GPU per node: one ring
    assert one.src.tolist() == [3, 11] and one.dst.tolist() == [11, 3]


def test_zero3_gathers_each_layer_forward_and_backward_before_it_runs() -> None:
    """ZeRO-3: gradients reduce-scattered ((n-1)/n), every layer's parameters all-gathered
    ((n-1)/n) before its forward and again before its backward, none after the step; the
    weights sharded, with two layers' gathered parameters held."""
    r = _r("policies.optimizer.zero=3")
    m = r.model
    dense = m.non_expert_params() * 2.0
    expert = len(m.moe_layers) * r.slots_per_rank * m.expert_params * 2.0
    once = 8 * (7 / 8) * dense + 4 * 2 * (1 / 2) * expert  # every GPU's share, once
    res = simulate(r)
    assert res.summary["data_parallel"]["bytes_intra_node"] == pytest.approx(3 * once, rel=1e-9)
    # a layer computes only once its parameters have arrived
    spans = res.timeline_table()
    for gpu in (0, 5):
        mine = spans[(spans.gpu == gpu) & (spans.step == 0)]
        for layer in (0, 7, 15):
            gather = mine[(mine.layer == layer) & (mine.phase == "dp_comm")]
            attention = mine[(mine.layer == layer) & (mine.phase == "attention")]
            first_gather_end = (gather.start_us + gather.duration_us).min()
            assert first_gather_end <= attention.start_us.min() + 1e-6
    dense_l, expert_l = gradsync.layer_params(r)
    shard = gradsync.shard_params(r)
    usage = hbm_usage(r, r.slots_per_rank)
    assert usage.weights == pytest.approx(2.0 * (shard + 2 * (dense_l + expert_l).max()))
    assert usage.optimizer == pytest.approx(12 * shard + 2 * shard)
