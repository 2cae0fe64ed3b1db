"""Synthetic routing: distinct experts per token, seeded, uniform vs Zipf loads."""

from __future__ import annotations

import numpy as np

from moesim.routing.sources import distinct_topk, zipf_popularity


def test_topk_is_distinct_and_in_range() -> None:
    rng = np.random.default_rng(0)
    p = zipf_popularity(3, 16, 2.0, rng)
    x = distinct_topk(p, 5000, 4, rng)
    assert x.shape == (3, 5000, 4)
    assert x.min() >= 0 and x.max() < 16
    s = np.sort(x, axis=-1)
    assert (s[..., 1:] != s[..., :-1]).all()


def test_same_seed_same_draw() -> None:
    p = np.full((2, 8), 1 / 8)
    a = distinct_topk(p, 100, 2, np.random.default_rng(7))
    b = distinct_topk(p, 100, 2, np.random.default_rng(7))
    assert (a == b).all()


def test_uniform_loads_are_even_and_zipf_loads_are_skewed() -> None:
    rng = np.random.default_rng(1)
    uni = np.bincount(distinct_topk(np.full((1, 32), 1 / 32), 20000, 4, rng).ravel(), minlength=32)
    zipf = np.bincount(
        distinct_topk(zipf_popularity(1, 32, 1.2, rng), 20000, 4, rng).ravel(), minlength=32
    )
    assert uni.max() / uni.mean() < 1.1
    assert zipf.max() / zipf.mean() > 3.0


def test_zipf_layers_have_different_hot_experts() -> None:
    p = zipf_popularity(4, 64, 1.0, np.random.default_rng(3))
    assert len(set(p.argmax(axis=1).tolist())) > 1
