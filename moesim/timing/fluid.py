"""The fluid schedule of a transfer that shares no link with any other transfer.

Such a transfer's flows see only each other, so its whole max-min fluid evolution can be
computed at once when it starts. The rule is the same as the dynamic network's
(:mod:`moesim.timing.network`): at each rate update the earliest-finishing flow, and every flow
finishing within ``window`` seconds after it, retire at their own finish times; rates are
recomputed when the last of them has finished.

Two implementations give the same schedule: plain Python for small transfers (numpy's per-call
overhead dominates there) and numpy for large ones.
"""

from __future__ import annotations

import numpy as np

from moesim.timing.maxmin import SATURATED, max_min_rates

SMALL = 256


def _rates_small(cap: list[float], paths: list[list[int]], users: dict[int, list[int]],
                 live: set[int]) -> dict[int, float]:
    """Max-min rates of the flows ``live`` (progressive filling, plain Python).

    ``users[link]`` lists every flow of the transfer that crosses ``link``.
    """
    count: dict[int, int] = {}
    for link, fs in users.items():
        n = sum(1 for f in fs if f in live)
        if n:
            count[link] = n
    remaining = {link: cap[link] for link in count}
    rate: dict[int, float] = {}
    level = 0.0
    while count:
        step = min(remaining[link] / n for link, n in count.items())
        level += step
        full = []
        for link, n in count.items():
            left = remaining[link] - step * n
            remaining[link] = left
            if left <= SATURATED * cap[link]:
                full.append(link)
        for link in full:
            for f in users[link]:
                if f in rate or f not in live:
                    continue
                rate[f] = level
                for other in paths[f]:
                    c = count.get(other)
                    if c == 1:
                        del count[other]
                    elif c is not None:
                        count[other] = c - 1
    return rate


def _schedule_small(cap: list[float], paths: list[list[int]], nbytes: list[float],
                    window: float) -> list[float]:
    users: dict[int, list[int]] = {}
    for f, path in enumerate(paths):
        for link in path:
            users.setdefault(link, []).append(f)
    rem = list(nbytes)
    live = set(range(len(rem)))
    finish = [0.0] * len(rem)
    now = 0.0
    while live:
        rate = _rates_small(cap, paths, users, live)
        ends = {f: now + (rem[f] if rem[f] > 0 else 0.0) / rate[f] for f in live}
        cut = min(ends.values()) + window
        batch = [f for f, e in ends.items() if e <= cut]
        nxt = max(ends[f] for f in batch)
        for f in batch:
            finish[f] = ends[f]
            live.discard(f)
        dt = nxt - now
        for f in live:
            rem[f] -= rate[f] * dt
        now = nxt
    return finish


def _schedule_numpy(capacity: np.ndarray, paths: np.ndarray, nbytes: np.ndarray,
                    window: float) -> np.ndarray:
    rem = nbytes.astype(np.float64).copy()
    idx = np.arange(rem.size)
    finish = np.zeros(rem.size)
    now = 0.0
    while idx.size:
        p = paths[idx]
        live = p >= 0
        rate = max_min_rates(capacity, np.nonzero(live)[0], p[live], idx.size)
        ends = now + np.maximum(rem[idx], 0.0) / rate
        batch = ends <= ends.min() + window
        finish[idx[batch]] = ends[batch]
        nxt = float(ends[batch].max())
        keep = ~batch
        rem[idx[keep]] -= rate[keep] * (nxt - now)
        idx = idx[keep]
        now = nxt
    return finish


def fluid_schedule(capacity: np.ndarray, paths: np.ndarray, nbytes: np.ndarray,
                   window: float) -> np.ndarray:
    """Seconds after the start at which each flow's last byte leaves (latency not included).

    Args:
        capacity: ``[links]`` bytes per second.
        paths: ``[flows, hops]`` link ids, -1 padded.
        nbytes: ``[flows]`` bytes.
        window: Batching window in seconds (0: exact fluid model).

    Returns:
        ``[flows]`` finish times in seconds.
    """
    if nbytes.size <= SMALL:
        plist = [[link for link in row if link >= 0] for row in paths.tolist()]
        return np.array(_schedule_small(capacity.tolist(), plist, nbytes.tolist(), window))
    return _schedule_numpy(capacity, paths, nbytes, window)
