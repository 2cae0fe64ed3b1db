"""Max-min fairness on small networks with known answers; the compiled and numpy solvers agree."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.timing.maxmin import _compiled, max_min_rates, max_min_rates_numpy

SOLVERS = [max_min_rates, max_min_rates_numpy]


@pytest.mark.parametrize("max_min_rates", SOLVERS)
def test_single_link_shared_equally(max_min_rates) -> None:  # type: ignore[no-untyped-def]
    rates = max_min_rates(np.array([12.0]), np.array([0, 1, 2]), np.array([0, 0, 0]), 3)
    assert np.allclose(rates, 4.0)


@pytest.mark.parametrize("max_min_rates", SOLVERS)
def test_classic_parking_lot(max_min_rates) -> None:  # type: ignore[no-untyped-def]
    # Links A (cap 10) and B (cap 4). Flow 0 crosses A and B, flow 1 only A, flow 2 only B.
    # B is the bottleneck for flows 0 and 2 (2 each); flow 1 takes the rest of A (8).
    flow_of = np.array([0, 0, 1, 2])
    link_of = np.array([0, 1, 0, 1])
    rates = max_min_rates(np.array([10.0, 4.0]), flow_of, link_of, 3)
    assert np.allclose(rates, [2.0, 8.0, 2.0])


@pytest.mark.parametrize("max_min_rates", SOLVERS)
def test_no_link_over_capacity_and_each_flow_bottlenecked(max_min_rates) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)
    cap = rng.uniform(1, 10, 12)
    flow_of = np.repeat(np.arange(30), 3)
    link_of = np.concatenate([rng.choice(12, 3, replace=False) for _ in range(30)])
    rates = max_min_rates(cap, flow_of, link_of, 30)
    load = np.bincount(link_of, weights=rates[flow_of], minlength=12)
    assert (load <= cap * (1 + 1e-9)).all()
    saturated = load >= cap * (1 - 1e-9)
    for f in range(30):  # every flow crosses a saturated link where it has a maximal rate
        links = link_of[flow_of == f]
        ok = [
            saturated[link] and rates[f] >= rates[flow_of[link_of == link]].max() - 1e-9
            for link in links
        ]
        assert any(ok)


def test_the_compiled_solver_is_installed_and_agrees_with_numpy() -> None:
    """numba is a dependency: the compiled solver must load (a silent fallback to numpy would
    hide a 4x slowdown), and both solvers give the same rates on random and on skewed
    256-GPU-like incidences (shared links, duplicate entries, unsorted flows, idle links)."""
    assert _compiled() is not None
    rng = np.random.default_rng(3)
    for _ in range(200):
        links, flows = int(rng.integers(2, 80)), int(rng.integers(1, 400))
        hops = rng.integers(1, 5, size=flows)
        flow_of = rng.permutation(np.repeat(np.arange(flows), hops))
        link_of = rng.integers(0, links, size=flow_of.size)
        cap = rng.choice([1.0, 3.0, rng.uniform(0.5, 20)], size=links)
        a = max_min_rates(cap, flow_of, link_of, flows)
        b = max_min_rates_numpy(cap, flow_of, link_of, flows)
        np.testing.assert_allclose(a, b, rtol=1e-11)
    g = 256  # every pair of ranks, tx of the source and rx of the destination, skewed sizes
    src, dst = np.nonzero(~np.eye(g, dtype=bool))
    keep = rng.random(src.size) < rng.uniform(0.2, 1.0, g)[src]
    src, dst = src[keep], dst[keep]
    flow_of = np.repeat(np.arange(src.size), 2)
    link_of = np.stack([src, g + dst], axis=1).ravel()
    cap = rng.uniform(40e9, 50e9, 2 * g)
    np.testing.assert_allclose(
        max_min_rates(cap, flow_of, link_of, src.size),
        max_min_rates_numpy(cap, flow_of, link_of, src.size),
        rtol=1e-11,
    )


def test_the_compiled_heap_and_scan_give_the_same_rates_bit_for_bit() -> None:
    """The compiled solver finds the next link by a heap or by a scan (few links, many flows);
    both freeze links in the same order (smallest share, then smallest id), so a run's results
    do not depend on which one a transfer's shape picked. Equal capacities make ties."""
    from moesim.timing._maxmin_jit import fill

    rng = np.random.default_rng(5)
    for _ in range(100):
        links, flows = int(rng.integers(2, 60)), int(rng.integers(1, 300))
        flow_of = rng.permutation(np.repeat(np.arange(flows), rng.integers(1, 5, size=flows)))
        link_of = rng.integers(0, links, size=flow_of.size)
        cap = rng.choice([2.0, 5.0], size=links)
        assert np.array_equal(
            fill(cap, flow_of, link_of, flows, 1), fill(cap, flow_of, link_of, flows, 2)
        )
    g = 256  # every pair of ranks over tx and rx NIC links of one capacity
    src, dst = np.nonzero(~np.eye(g, dtype=bool))
    keep = rng.random(src.size) < 0.7
    n = int(keep.sum())
    flow_of = np.repeat(np.arange(n), 2)
    link_of = np.stack([src[keep], g + dst[keep]], axis=1).ravel()
    cap = np.full(2 * g, 48e9)
    assert np.array_equal(fill(cap, flow_of, link_of, n, 1), fill(cap, flow_of, link_of, n, 2))
    # uneven capacities and paths of up to four links: shares that a freeze leaves a rounding
    # lower are queued at once by the lazy heap, so the order still matches the scan's
    for _ in range(30):
        links, flows = int(rng.integers(20, 200)), int(rng.integers(500, 5000))
        flow_of = rng.permutation(np.repeat(np.arange(flows), rng.integers(1, 5, size=flows)))
        link_of = rng.integers(0, links, size=flow_of.size)
        cap = rng.uniform(1e9, 1e11, links) / 3.0
        assert np.array_equal(
            fill(cap, flow_of, link_of, flows, 1), fill(cap, flow_of, link_of, flows, 2)
        )
