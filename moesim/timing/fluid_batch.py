"""Fluid schedules of many independent transfers at once, in lockstep on arrays.

Every isolated transfer of a step is known before the step runs (its flows follow from the
routing), and the transfers never share a link. This module advances all of them together:
each round computes the max-min rates of all of them at once (every transfer has its own copy
of the link set, so they cannot disturb one another), then retires each transfer's earliest
flow and those due within its window (the rule of the dynamic network,
:mod:`moesim.timing.network`). One transfer alone is the
same call with a list of one.
"""

from __future__ import annotations

import numpy as np

from moesim.timing.maxmin import max_min_rates


def batched_fluid_schedule(
    capacity: np.ndarray,
    paths: list[np.ndarray],
    nbytes: list[np.ndarray],
    windows: np.ndarray,
    compiled: bool = True,
) -> list[np.ndarray]:
    """Finish time (seconds after each transfer's start) of every flow of every transfer.

    Args:
        capacity: ``[links]`` bytes per second.
        paths: One ``[flows, hops]`` link-id array (-1 padded) per transfer.
        nbytes: One ``[flows]`` byte array per transfer.
        windows: ``[transfers]`` batching window of each transfer, seconds.
        compiled: Use the compiled max-min solver (:func:`moesim.timing.maxmin.max_min_rates`).

    Returns:
        One ``[flows]`` finish-time array per transfer (latency not included).
    """
    n_links, transfers = capacity.size, len(paths)
    sizes = [p.shape[0] for p in paths]
    all_paths = np.concatenate(paths)
    tid = np.repeat(np.arange(transfers), sizes)
    live = all_paths >= 0
    flow = np.nonzero(live)[0]
    link = all_paths[live] + tid[flow] * n_links
    cap = np.tile(capacity.astype(np.float64), transfers)
    rem = np.concatenate(nbytes).astype(np.float64)
    alive = np.ones(rem.size, dtype=bool)
    finish = np.zeros(rem.size)
    now = np.zeros(transfers)
    while alive.any():
        keep = alive[flow]
        rate = np.zeros(rem.size)
        rate[alive] = max_min_rates(
            cap, np.cumsum(alive)[flow[keep]] - 1, link[keep], int(alive.sum()), compiled=compiled
        )
        idx = np.nonzero(alive)[0]
        t = tid[idx]
        ends = now[t] + np.maximum(rem[idx], 0.0) / rate[idx]
        first = np.full(transfers, np.inf)
        np.minimum.at(first, t, ends)
        batch = ends <= first[t] + windows[t]
        finish[idx[batch]] = ends[batch]
        alive[idx[batch]] = False
        rest = idx[~batch]
        rem[rest] -= rate[rest] * (first[tid[rest]] - now[tid[rest]])
        now = np.where(np.isfinite(first), first, now)
    return np.split(finish, np.cumsum(sizes)[:-1])
