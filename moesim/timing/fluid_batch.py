"""Fluid schedules of many independent transfers at once, in lockstep on arrays.

Every isolated transfer of a step is known before the step runs (its flows follow from the
routing), and the transfers never share a link. This module advances all of them together:
each round runs one max-min progressive filling in which every transfer fills its own copy of
the link set, then retires each transfer's earliest flow and those due within its window
(the rule of the dynamic network, :mod:`moesim.timing.network`). One transfer alone is the
same call with a list of one.
"""

from __future__ import annotations

import numpy as np

from moesim.timing.maxmin import SATURATED


def _lockstep_rates(
    cap: np.ndarray,
    flow: np.ndarray,
    link: np.ndarray,
    tid: np.ndarray,
    alive: np.ndarray,
    n_links: int,
) -> np.ndarray:
    """Max-min rates of the alive flows, every transfer filling its own links.

    Args:
        cap: ``[transfers * n_links]`` capacity of each transfer's copy of each link.
        flow / link: Incidence entries (flow index, link index in the copied link space).
        tid: ``[flows]`` transfer of each flow.
        alive: ``[flows]`` flows still sending.
        n_links: Links of the topology.
    """
    transfers = cap.size // n_links
    keep = alive[flow]
    f, lk = flow[keep], link[keep]
    remaining = cap.copy()
    rate = np.zeros(alive.size)
    frozen = ~alive
    level = np.zeros(transfers)
    while f.size:
        count = np.bincount(lk, minlength=cap.size)
        used = count > 0
        share = np.full(cap.size, np.inf)
        share[used] = remaining[used] / count[used]
        step = share.reshape(transfers, n_links).min(axis=1)
        step[~np.isfinite(step)] = 0.0
        level += step
        remaining -= np.repeat(step, n_links) * count
        full = used & (remaining <= SATURATED * cap)
        hit = f[full[lk]]
        rate[hit] = level[tid[hit]]
        frozen[hit] = True
        live = ~frozen[f]
        f, lk = f[live], lk[live]
    return rate


def batched_fluid_schedule(
    capacity: np.ndarray, paths: list[np.ndarray], nbytes: list[np.ndarray], windows: np.ndarray
) -> list[np.ndarray]:
    """Finish time (seconds after each transfer's start) of every flow of every transfer.

    Args:
        capacity: ``[links]`` bytes per second.
        paths: One ``[flows, hops]`` link-id array (-1 padded) per transfer.
        nbytes: One ``[flows]`` byte array per transfer.
        windows: ``[transfers]`` batching window of each transfer, seconds.

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
        rate = _lockstep_rates(cap, flow, link, tid, alive, n_links)
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
