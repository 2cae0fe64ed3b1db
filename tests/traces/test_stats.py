"""Trace statistics on cases whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.traces.stats import balance, gini, trace_stats
from tests.traces.conftest import make_trace


def test_balanced_routing_scores_perfect() -> None:
    experts = np.arange(2 * 64).reshape(2, 64, 1) % 8  # every expert 8 times per layer
    stats = trace_stats(make_trace(experts, 8, weights=np.ones((128, 1), np.float32)))
    for row in stats["layers"]:
        assert row["max_over_mean"] == 1.0 and row["gini"] == 0.0 and row["cv"] == 0.0
        assert row["entropy"] == pytest.approx(1.0)
        assert row["aux_loss"] == pytest.approx(1.0)
        assert row["experts_used"] == 8


def test_one_hot_expert_is_maximally_unbalanced() -> None:
    b = balance(np.array([10, 0, 0, 0], dtype=float))
    assert b["max_over_mean"] == 4.0 and b["entropy"] == 0.0
    assert gini(np.array([10, 0, 0, 0])) == pytest.approx(0.75)  # 1 - 1/E


def test_aux_loss_grows_with_imbalance_and_uses_logits() -> None:
    n = 100
    experts = np.zeros((1, n, 1), dtype=np.int16)
    logits = np.full((n, 4), -30.0, dtype=np.float32)
    logits[:, 0] = 30.0  # all probability on expert 0, all tokens to expert 0
    stats = trace_stats(make_trace(experts, 4, logits=logits))
    assert stats["layers"][0]["aux_loss_from"] == "logits"
    assert stats["layers"][0]["aux_loss"] == pytest.approx(4.0)  # E * 1 * 1


def test_affinity_of_a_copied_layer_is_the_identity() -> None:
    rng = np.random.default_rng(0)
    first = rng.integers(0, 6, size=(1, 300, 1))
    stats = trace_stats(make_trace(np.concatenate([first, first]), 6))
    matrix = np.array(stats["affinity"][0]["matrix"])
    assert np.allclose(matrix, np.eye(6))
    assert stats["affinity"][0]["top1_conditional"] == 1.0
    assert stats["affinity"][0]["dependence"] > 0.7


def test_independent_layers_have_little_dependence() -> None:
    rng = np.random.default_rng(0)
    experts = rng.integers(0, 4, size=(2, 20000, 1))
    assert trace_stats(make_trace(experts, 4))["affinity"][0]["dependence"] < 0.02


def test_reuse_between_steps_and_tokens() -> None:
    # one sequence whose tokens alternate experts 0,1,0,1: no token reuse.
    experts = np.array([0, 1, 0, 1]).reshape(1, 4, 1)
    stats = trace_stats(make_trace(experts, 2, seq_len=4))
    assert stats["layers"][0]["token_reuse"] == 0.0
    # a constant sequence reuses everything
    stats = trace_stats(make_trace(np.zeros((1, 4, 1), dtype=int), 2, seq_len=4))
    assert stats["layers"][0]["token_reuse"] == 1.0


def test_stats_json_of_a_trace_without_weights_is_strict_json(tmp_path) -> None:
    from typer.testing import CliRunner

    from moesim.cli import app
    from tests.conftest import strict_json

    experts = np.arange(2 * 64).reshape(2, 64, 1) % 8
    path = make_trace(experts, 8).write(tmp_path / "t.parquet")  # no weights, no logits
    out = CliRunner().invoke(app, ["trace", "stats", str(path), "--json"])
    assert out.exit_code == 0, out.output
    stats = strict_json(out.stdout)
    assert stats["layers"][0]["aux_loss"] is None
