"""The calibrated expert-time model: fit, prediction, held-out check."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from moesim.calibration.fit import ExpertTimeTable, fit_cases, fit_table, nnls
from moesim.calibration.plan import ExpertShape, make_plan, token_grid


def test_nnls_matches_brute_force_over_active_sets() -> None:
    rng = np.random.default_rng(1)
    a = rng.standard_normal((12, 4))
    b = rng.standard_normal(12)
    x = nnls(a, b)
    assert (x >= 0).all()
    best = np.inf
    for mask in itertools.product([False, True], repeat=4):
        cols = np.array(mask)
        z = np.zeros(4)
        if cols.any():
            z[cols] = np.linalg.lstsq(a[:, cols], b, rcond=None)[0]
        if (z >= 0).all():
            best = min(best, float(np.linalg.norm(a @ z - b)))
    assert np.linalg.norm(a @ x - b) == pytest.approx(best, rel=1e-9)


def test_table_prediction_interpolates_in_log_tokens_and_extrapolates_linearly() -> None:
    t = ExpertTimeTable(np.array([1.0, 4.0, 16.0]), np.array([1.0, 2.0, 8.0]), 0.5)
    assert t.per_expert(np.array([0, 1, 2, 4, 8, 16, 32])).tolist() == [0, 1, 1.5, 2, 5, 8, 16]
    assert t.predict(np.array([[0, 0], [1, 0], [4, 16]])).tolist() == [0.0, 1.5, 10.5]


def _device(counts: np.ndarray, rng: np.random.Generator, noise: float) -> float:
    """A synthetic GPU: a per-call cost, then each busy expert reads its weights and computes
    in 64-row tiles (tile quantisation makes f a staircase, not a line)."""
    per = np.where(counts > 0, 20e-6 + 3e-6 * np.ceil(counts / 64), 0.0)
    return float((15e-6 + per.sum()) * (1 + noise * rng.standard_normal()))


def test_fit_predicts_held_out_distributions_within_ten_percent() -> None:
    rng = np.random.default_rng(0)
    plan = make_plan([ExpertShape(4096, 14336, 3, "bf16")], 8, 4096, seed=3)
    records = [
        {
            **c.as_json(),
            "seconds": _device(np.array(c.counts), rng, 0.02),
        }
        for c in plan.cases
    ]
    table, check = fit_cases(records)
    assert check["holdout_cases"] >= 1
    assert check["holdout_max_abs_error"] <= 0.10
    # every held-out case was left out of the fit: refitting on the fitted cases only is the same
    train = [r for r in records if not r["holdout"]]
    again = fit_table(
        table.tokens,
        [np.array(r["counts"]) for r in train],
        np.array([r["seconds"] for r in train]),
    )
    assert np.allclose(again.seconds, table.seconds)
    assert table.overhead_s == pytest.approx(15e-6, rel=0.5)


def test_the_time_depends_on_the_vector_not_only_its_sum() -> None:
    grid = np.array(token_grid(256), dtype=float)
    counts = [np.full(8, n) for n in grid.astype(int)] + [
        np.array([n] + [0] * 7) for n in grid.astype(int)
    ]
    rng = np.random.default_rng(0)
    seconds = np.array([_device(c, rng, 0.0) for c in counts])
    table = fit_table(grid, counts, seconds)
    even, one_hot = np.full(8, 32), np.array([256, 0, 0, 0, 0, 0, 0, 0])
    assert table.predict(even) > 2 * table.predict(one_hot)  # 8 weight reads against 1
    # exact at grid points: the model holds this device's structure (call cost + per expert)
    assert table.predict(even) == pytest.approx(_device(even, rng, 0.0), rel=1e-6)
    assert table.predict(one_hot) == pytest.approx(_device(one_hot, rng, 0.0), rel=1e-6)
    assert table.overhead_s == pytest.approx(15e-6, rel=1e-6)


def test_plan_holds_out_ten_percent_of_uneven_cases_and_keeps_totals() -> None:
    shapes = [ExpertShape(256, 512, 3, "fp32"), ExpertShape(256, 512, 2, "fp32")]
    plan = make_plan(shapes, 8, 64, seed=0)
    for shape in shapes:
        own = [c for c in plan.cases if c.shape == shape]
        held = [c for c in own if c.holdout]
        assert len(held) == int(np.ceil(0.1 * len(own)))
        assert all(not c.label.startswith("uniform") for c in held)
        for c in own:
            n = int(c.label.rsplit("-", 1)[1])
            assert sum(c.counts) == n * 8
    assert token_grid(16384)[:6] == [1, 2, 3, 4, 6, 8] and token_grid(16384)[-1] == 16384
    with pytest.raises(ValueError, match="experts"):
        make_plan(shapes, 1, 64)
