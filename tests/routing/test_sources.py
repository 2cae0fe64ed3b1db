"""Synthetic routing: distinct experts per token, seeded, Zipf skew, group-limited draws."""

from __future__ import annotations

import numpy as np
import pytest

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


GROUP_CASES = [(8, 4, "top2_sum"), (8, 4, "max"), (4, 4, "max"), (2, 2, "max"), (1, 1, "max")]


@pytest.mark.parametrize(
    ("n_group", "topk_group", "score", "how"),
    [
        (*case, how)
        for case in GROUP_CASES
        for how in ("numpy", "exact", "patterns")
        if how != "patterns" or case[1] < case[0]  # every group kept: drawn exactly
    ],
)
def test_group_limited_order_statistics_draw_matches_scoring_every_expert(
    n_group: int, topk_group: int, score: str, how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The numpy draw, the compiled exact one and the one by patterns (which keeps fewer
    groups than there are: the others run exactly) against scoring every expert."""
    from moesim.routing import patterns, sources
    from moesim.routing.sources import group_limited_topk, group_limited_topk_scored

    # the compiled kernels run from GROUP_COMPILED_MIN_TOKENS tokens on: lower it here
    monkeypatch.setattr(sources, "GROUP_COMPILED_MIN_TOKENS", 1 << 30 if how == "numpy" else 1)
    if how == "exact":
        monkeypatch.setattr(patterns, "MAX_PATTERNS", 0)

    n, experts, k = 40_000, 256, 8
    per = experts // n_group
    fast = group_limited_topk(n, experts, k, n_group, topk_group, np.random.default_rng(1), score)
    ref = group_limited_topk_scored(
        n, experts, k, n_group, topk_group, np.random.default_rng(2), score
    )
    assert fast.shape == (n, k) and fast.dtype == np.int16
    assert (np.sort(fast, axis=1)[:, 1:] != np.sort(fast, axis=1)[:, :-1]).all()  # distinct

    def shape_of(x: np.ndarray) -> np.ndarray:
        """Per token: experts taken from each group, sorted (the routing's group profile)."""
        g = x.astype(np.int64) // per
        counts = np.zeros((n, n_group), dtype=np.int64)
        np.add.at(counts, (np.arange(n)[:, None], g), 1)
        return -np.sort(-counts, axis=1)

    for a, b in zip(shape_of(fast).T, shape_of(ref).T, strict=True):  # the i-th largest group
        pa, pb = (np.bincount(v, minlength=k + 1) / n for v in (a, b))
        sigma = np.sqrt((pa * (1 - pa) + pb * (1 - pb)) / n)
        assert (np.abs(pa - pb) <= 5 * sigma + 1e-3).all(), (pa, pb)
    # Experts evenly used, and the best pick as likely from any group.
    load = np.bincount(fast.ravel().astype(np.int64), minlength=experts)
    assert load.std() / load.mean() < 0.05
    first = np.bincount(fast[:, 0].astype(np.int64) // per, minlength=n_group) / n
    assert np.abs(first - 1 / n_group).max() < 5 * np.sqrt(1 / n_group / n) + 1e-3
    # Group-limited: no token reaches more than topk_group groups.
    assert ((shape_of(fast) > 0).sum(axis=1) <= topk_group).all()


def test_group_limited_compiled_parts() -> None:
    """The compiled draws' pieces: the interpolated half-normal score within 5e-9 of Acklam's
    (measured 3.8e-9), the ziggurat's exponentials exponential, and a draw that does not
    depend on the threads."""
    import numba

    from moesim.routing import _group_jit as gj
    from moesim.routing.patterns import group_limited_draw

    rng = np.random.default_rng(0)
    depths = np.concatenate(
        [rng.exponential(size=50_000) / 32, np.exp(rng.uniform(-30, 5, 50_000))]
    )
    assert np.abs(gj.half_normal_table_error(depths)).max() < 5e-9
    x = gj.exponentials(1, 1_000_000)
    quantiles = np.quantile(x, [0.1, 0.5, 0.9, 0.99, 0.999])
    exact = -np.log1p(-np.array([0.1, 0.5, 0.9, 0.99, 0.999]))
    assert np.abs(quantiles / exact - 1).max() < 0.02
    assert x.mean() == pytest.approx(1.0, abs=0.005) and x.var() == pytest.approx(1.0, abs=0.01)
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = group_limited_draw(np.array([7]), 20_000, 8, 32, 8, 4, True)[0]
    finally:
        numba.set_num_threads(threads)
    two = group_limited_draw(np.array([5, 7]), 20_000, 8, 32, 8, 4, True)  # a draw per seed
    assert (two[1] == one).all() and (two[0] != one).any()
    assert (gj.exact_draw(7, 5_000, 8, 32, 8, 4, True) != one[:5_000]).any()  # another draw


def test_uniform_distinct_compiled_draw() -> None:
    """The compiled uniform draw (large uniform chunks of distinct_topk): distinct experts per
    token, each expert as likely in every slot, pairs of experts as likely as any other pair,
    and the same draw whatever the threads."""
    import numba

    from moesim.routing._streams import uniform_distinct

    n, k, e = 200_000, 8, 64
    x = uniform_distinct(11, n, k, e).astype(np.int64)
    assert x.dtype == np.int64 and x.min() >= 0 and x.max() < e
    assert (np.sort(x, axis=1)[:, 1:] != np.sort(x, axis=1)[:, :-1]).all()
    for j in (0, k - 1):  # the first and the last slot, uniform
        freq = np.bincount(x[:, j], minlength=e) / n
        assert np.abs(freq - 1 / e).max() < 5 * np.sqrt(1 / e / n)
    pair = np.zeros((e, e))  # co-occurrence of experts 0..3 with every other, within a token
    for a in range(4):
        has = (x == a).any(axis=1)
        pair[a] = np.bincount(x[has].ravel(), minlength=e)
        pair[a, a] = np.nan
    p = k * (k - 1) / (e * (e - 1))  # P(two given experts both picked)
    expect = n * p
    assert np.nanmax(np.abs(pair[:4] - expect)) < 5 * np.sqrt(expect)
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = uniform_distinct(11, 10_000, k, e)
    finally:
        numba.set_num_threads(threads)
    assert (uniform_distinct(11, 10_000, k, e) == one).all()


def test_shipped_pattern_tables_are_what_tabulating_gives() -> None:
    """The pattern tables shipped for the presets (python -m moesim.routing.patterns) hold
    what tabulating the exact draws gives now, and every pattern keeps the group-limited
    rule (each pick's group one of the kept ones; a kept group's picks at most top_k)."""
    from moesim.routing import patterns

    for cfg in patterns.SHIPPED:
        with np.load(patterns.table_path(cfg)) as f:
            rows, counts = f["rows"], f["counts"]
        fresh_rows, fresh_counts = patterns.tabulate(cfg)
        assert np.array_equal(rows, fresh_rows) and np.array_equal(counts, fresh_counts)
        assert counts.sum() == patterns.SAMPLES and rows.max() < cfg[3]
