"""Max-min fair rates of flows sharing links (progressive filling), on arrays.

Flows and links are given as a sparse incidence in coordinate form: entry ``i`` says flow
``flow_of[i]`` crosses link ``link_of[i]``. All unfrozen flows grow at the same rate until some
link is full; flows crossing a full link freeze at that rate; repeat. The result is the unique
max-min fair allocation.
"""

from __future__ import annotations

import numpy as np

SATURATED = 1e-9


def max_min_rates(
    capacity: np.ndarray, flow_of: np.ndarray, link_of: np.ndarray, n_flows: int
) -> np.ndarray:
    """Max-min fair rate of every flow.

    Args:
        capacity: ``[links]`` float64, bytes per second of each link.
        flow_of: ``[nnz]`` int64, the flow of each incidence entry.
        link_of: ``[nnz]`` int64, the link of each incidence entry.
        n_flows: Number of flows (every flow must cross at least one link).

    Returns:
        ``[n_flows]`` float64 rates in bytes per second.
    """
    links, link_idx = np.unique(link_of, return_inverse=True)
    cap = capacity[links].astype(np.float64)
    remaining = cap.copy()
    rate = np.zeros(n_flows)
    frozen = np.zeros(n_flows, dtype=bool)
    f = flow_of
    level = 0.0
    while f.size:
        count = np.bincount(link_idx, minlength=links.size)
        used = count > 0
        share = np.full(links.size, np.inf)
        share[used] = remaining[used] / count[used]
        step = share.min()
        level += step
        remaining -= step * count
        full = used & (remaining <= SATURATED * cap)
        hit = f[full[link_idx]]
        rate[hit] = level
        frozen[hit] = True
        keep = ~frozen[f]
        f, link_idx = f[keep], link_idx[keep]
    return rate
