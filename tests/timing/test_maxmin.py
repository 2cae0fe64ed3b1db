"""Max-min fairness on small networks with known answers."""

from __future__ import annotations

import numpy as np

from moesim.timing.maxmin import max_min_rates


def test_single_link_shared_equally() -> None:
    rates = max_min_rates(np.array([12.0]), np.array([0, 1, 2]), np.array([0, 0, 0]), 3)
    assert np.allclose(rates, 4.0)


def test_classic_parking_lot() -> None:
    # Links A (cap 10) and B (cap 4). Flow 0 crosses A and B, flow 1 only A, flow 2 only B.
    # B is the bottleneck for flows 0 and 2 (2 each); flow 1 takes the rest of A (8).
    flow_of = np.array([0, 0, 1, 2])
    link_of = np.array([0, 1, 0, 1])
    rates = max_min_rates(np.array([10.0, 4.0]), flow_of, link_of, 3)
    assert np.allclose(rates, [2.0, 8.0, 2.0])


def test_no_link_over_capacity_and_each_flow_bottlenecked() -> None:
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
