"""Gating variants on known small cases, and re-gating in the routing stage."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from moesim.config.loading import load_scenario
from moesim.policies.gating import (
    GATINGS,
    GateContext,
    aux_loss,
    balanced_assignment,
    sinkhorn,
)
from moesim.runner import simulate
from tests.conftest import SCENARIOS

S = np.array(
    [
        [3.0, 1.0, 0.0, 2.0],
        [2.9, 0.0, 1.0, 0.5],
        [2.8, 2.7, 0.1, 0.0],
        [0.0, 0.2, 0.1, 3.0],
    ]
)


def gate(name: str, scores: np.ndarray, **ctx) -> np.ndarray:
    fn = GATINGS.get(name).select
    assert fn is not None
    return fn(scores, GateContext(**{"top_k": 2, **ctx}))


def test_top_k_and_top_1() -> None:
    assert gate("top_k", S).tolist() == [[0, 3], [0, 2], [0, 1], [3, 1]]
    assert gate("top_1", S).tolist() == [[0], [0], [0], [3]]


def test_group_limited_keeps_the_best_groups() -> None:
    # 2 groups {0,1} and {2,3}; token 0's group scores: 3+1=4 vs 0+2=2 -> group 0 only
    out = gate("group_limited", S, n_group=2, topk_group=1)
    assert out[0].tolist() == [0, 1]
    assert out[3].tolist() == [3, 2]  # group {2,3}: 0.1+3 > 0+0.2


def test_expert_choice_each_expert_takes_its_top_tokens() -> None:
    out = gate("expert_choice", S, top_k=1, factor=1.0)  # c = ceil(4*1/4) = 1 token per expert
    taken = {(t, int(e)) for t in range(4) for e in out[t] if e >= 0}
    # probabilities decide: expert 0 -> token 1 (rows softmaxed), each expert exactly one token
    assert sorted(e for _, e in taken) == [0, 1, 2, 3]
    counts = np.bincount(out[out >= 0], minlength=4)
    assert counts.tolist() == [1, 1, 1, 1]


def test_base_gives_equal_loads_and_the_optimal_assignment() -> None:
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(8, 4))
    out = gate("base", scores)[:, 0]
    assert np.bincount(out, minlength=4).tolist() == [2, 2, 2, 2]
    # brute force over all balanced assignments of 8 tokens to 4 experts (2 each)
    best = -np.inf
    for perm in set(itertools.permutations([0, 0, 1, 1, 2, 2, 3, 3])):
        best = max(best, scores[np.arange(8), list(perm)].sum())
    assert scores[np.arange(8), out].sum() == pytest.approx(best, abs=8 * 1e-3)


def test_balanced_assignment_respects_uneven_capacities() -> None:
    scores = np.array([[5.0, 0.0], [4.0, 0.0], [3.0, 0.0]])
    out = balanced_assignment(scores, np.array([1, 2]))
    assert out.tolist() == [0, 1, 1]


def test_s_base_balances_the_columns() -> None:
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(64, 8)) + np.array([3.0, 0, 0, 0, 0, 0, 0, 0])
    p = sinkhorn(scores)
    assert np.allclose(p.sum(axis=1), 1.0, atol=1e-6)
    assert np.allclose(p.sum(axis=0), 8.0, atol=1e-3)
    plain = np.bincount(gate("top_k", scores, top_k=1)[:, 0], minlength=8)
    balanced = np.bincount(gate("s_base", scores, top_k=1)[:, 0], minlength=8)
    assert balanced.max() < plain.max()


def test_sentence_routes_a_sequence_as_one() -> None:
    seq = np.array([0, 0, 1, 1])
    out = gate("sentence", S, seq_id=seq)
    assert out[0].tolist() == out[1].tolist() == [0, 3]  # mean of rows 0, 1: 2.95, .5, .5, 1.25
    assert out[2].tolist() == out[3].tolist() == [3, 1]  # mean of rows 2, 3: 1.4, 1.45, .1, 1.5


def test_aux_loss_is_one_when_balanced() -> None:
    flat = np.zeros((4, 4))
    assert aux_loss(flat, np.arange(4)[:, None]) == pytest.approx(1.0)
    assert aux_loss(flat, np.zeros((4, 1), dtype=np.int64)) == pytest.approx(1.0)  # P uniform
    assert aux_loss(S, np.zeros((4, 1), dtype=np.int64)) > 1.0  # all on the likeliest expert


@pytest.mark.parametrize("name", [n for n in GATINGS.names() if GATINGS.get(n).needs_scores])
def test_every_gate_picks_distinct_known_experts(name: str) -> None:
    rng = np.random.default_rng(3)
    scores = rng.standard_normal((40, 8)).astype(np.float32)
    out = gate(name, scores, n_group=4, topk_group=2, seq_id=np.arange(40) // 10)
    assert out.shape[0] == 40 and out.shape[1] >= 1
    for row in out:
        chosen = row[row >= 0]  # expert choice may leave a token fewer experts (-1)
        assert len(set(chosen.tolist())) == chosen.size and (chosen < 8).all()
    assert (out >= 0).any()


@pytest.mark.parametrize("name", [n for n in GATINGS.names() if GATINGS.get(n).needs_scores])
def test_every_gate_runs_in_a_scenario_and_conserves_tokens(name: str) -> None:
    res = simulate(
        load_scenario(
            SCENARIOS / "qwen3-moe-train-2x8xh100.yaml",
            [
                f"policies.gating.type={name}",
                "workload.steps=1",
                "workload.seq_len=64",
                "model=olmoe-1b-7b",
            ],
        )
    )
    col, s = res.collector, res.summary
    assert (col.gpu_tokens.sum(axis=2) + col.dropped == col.routed).all()
    assert s["aux_loss"] is not None and s["aux_loss"] > 0
    if name in ("expert_choice", "base"):
        assert s["drop_rate"] == 0.0 and s["imbalance_max_over_mean"] < 1.2


def test_regating_a_trace_without_logits_is_a_clear_error() -> None:
    with pytest.raises(Exception, match="logits"):
        simulate(load_scenario(SCENARIOS / "quickstart.yaml", ["policies.gating.type=top_k"]))
