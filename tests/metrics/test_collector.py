"""The collector's hooks on hand-made cases whose numbers are known."""

from __future__ import annotations

import numpy as np

from moesim.metrics.collector import Collector
from moesim.routing.batch import TokenBatch
from moesim.routing.dispatch import LayerCounts
from moesim.routing.stage import StepRouting


def _counts(slot_tokens: np.ndarray, dropped: np.ndarray) -> LayerCounts:
    layers, ranks, _ = slot_tokens.shape
    zeros = np.zeros((layers, ranks, ranks), dtype=np.int64)
    return LayerCounts(
        slot_tokens=slot_tokens,
        routed=slot_tokens.sum(axis=2) + dropped,
        dropped=dropped,
        rank_copies=zeros,
        node_copies=zeros[:, :, :1],
        assignments=zeros,
        expert_routed=slot_tokens.reshape(layers, -1),
        dropped_by_bin=dropped.sum(axis=1, keepdims=True),
        padding=np.zeros_like(slot_tokens),
    )


def test_on_routing_counts_drops_per_gpu_and_imbalance() -> None:
    col = Collector(steps=1, layers=2, gpus=4, moe_layers=(1,), gpus_per_node=4, timeline_steps=0)
    # one MoE layer, 2 EP ranks of 2 slots, tp 2: GPUs 0,1 are rank 0 and GPUs 2,3 rank 1
    slot_tokens = np.array([[[6, 2], [1, 3]]])  # rank loads 8 and 4: max/mean 8/6
    dropped = np.array([[5, 0]])
    routing = StepRouting(
        batch=TokenBatch(np.zeros((2, 1), int), np.zeros((2, 1), int)),
        replicas=[_counts(slot_tokens, dropped)],
        aux_loss=np.array([1.25]),
    )
    layout = (np.zeros(4, int), np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1]), 2)
    col.on_routing(0, routing, np.ones((1, 4)), layout, top_k=2, seq_len=1)
    assert col.routed[0].tolist() == [17] and col.dropped[0].tolist() == [5]
    assert col.dropped_by_gpu[0, 0].tolist() == [5, 0, 0, 0]  # counted once per TP group
    assert col.imbalance[0, 0] == 8 / 6
    assert col.aux_loss[0].tolist() == [1.25]


def test_on_flows_splits_intra_and_inter_node_bytes() -> None:
    col = Collector(steps=1, layers=1, gpus=4, moe_layers=(0,), gpus_per_node=2, timeline_steps=0)
    src, dst = np.array([0, 0, 3]), np.array([1, 2, 2])
    col.on_flows(0, 0, src, dst, np.array([10.0, 20.0, 30.0]), gpn=2)
    assert col.bytes_intra[0] == 40.0 and col.bytes_inter[0] == 20.0
    assert col.bytes_out[0, 0].tolist() == [30.0, 0.0, 0.0, 30.0]


def test_flow_bytes_counted_compiled_as_on_numpy(monkeypatch) -> None:
    """Large phases have their bytes counted by a compiled pass: the same totals per GPU and
    between / within nodes as numpy's, a GPU's copies to itself left out."""
    from moesim.metrics import collector

    rng = np.random.default_rng(2)
    gpus, n = 64, 6000
    src, dst = rng.integers(0, gpus, n), rng.integers(0, gpus, n)
    nbytes = rng.integers(1, 40, n) * 7392.0
    cols = []
    for limit in (1, 1 << 30):  # compiled, then numpy
        monkeypatch.setattr(collector, "COMPILED_MIN_FLOWS", limit)
        col = Collector(steps=1, layers=1, gpus=gpus, moe_layers=(0,), gpus_per_node=8,
                        timeline_steps=0)  # fmt: skip
        col.on_flows(0, 0, src, dst, nbytes, 8, data_parallel=True)
        cols.append(col)
    a, b = cols
    assert np.array_equal(a.bytes_out, b.bytes_out)
    assert a.bytes_inter[0] == b.bytes_inter[0] and a.bytes_intra[0] == b.bytes_intra[0]
    assert np.array_equal(a.dp_bytes, b.dp_bytes)
    moved = src != dst
    assert a.bytes_inter[0] + a.bytes_intra[0] == nbytes[moved].sum()
