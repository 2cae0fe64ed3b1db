"""The fluid schedule of a transfer that shares no link with any other transfer.

Such a transfer's flows see only each other, so its whole max-min fluid evolution can be
computed at once when it starts. The rule is the same as the dynamic network's
(:mod:`moesim.timing.network`): when the earliest flow finishes, it and every flow due within
``window`` seconds after it retire at their own predicted finish times, and rates are
recomputed for the rest.

Two implementations give the same schedule: plain Python for small transfers (numpy's per-call
overhead dominates there) and numpy for large ones.
"""

from __future__ import annotations

import numpy as np

from moesim.timing.maxmin import SATURATED, max_min_rates

SMALL = 256


def _rates_small(
    cap: list[float], paths: list[list[int]], users: list[list[int]], alive: list[bool]
) -> list[float]:
    """Max-min rates of the alive flows (progressive filling, plain Python lists).

    Links are numbered ``0..len(cap)-1``; ``users[link]`` lists the flows crossing it.
    """
    count = [0] * len(cap)
    for f, path in enumerate(paths):
        if alive[f]:
            for link in path:
                count[link] += 1
    remaining = list(cap)
    frozen = [not a for a in alive]
    rate = [0.0] * len(paths)
    active = [link for link, n in enumerate(count) if n]
    level = 0.0
    while active:
        step = min(remaining[link] / count[link] for link in active)
        level += step
        full = []
        for link in active:
            remaining[link] -= step * count[link]
            if remaining[link] <= SATURATED * cap[link]:
                full.append(link)
        for link in full:
            for f in users[link]:
                if not frozen[f]:
                    frozen[f] = True
                    rate[f] = level
                    for other in paths[f]:
                        count[other] -= 1
        active = [link for link in active if count[link] > 0]
    return rate


def _schedule_small(
    cap: list[float], paths: list[list[int]], nbytes: list[float], window: float
) -> list[float]:
    local: dict[int, int] = {}
    lpaths = [[local.setdefault(link, len(local)) for link in path] for path in paths]
    lcap = [0.0] * len(local)
    for link, i in local.items():
        lcap[i] = cap[link]
    users: list[list[int]] = [[] for _ in lcap]
    for f, path in enumerate(lpaths):
        for link in path:
            users[link].append(f)
    n = len(nbytes)
    rem = list(nbytes)
    alive = [True] * n
    finish = [0.0] * n
    left, now = n, 0.0
    while left:
        rate = _rates_small(lcap, lpaths, users, alive)
        ends = [
            now + (rem[f] if rem[f] > 0 else 0.0) / rate[f] if alive[f] else np.inf
            for f in range(n)
        ]
        nxt = min(ends)
        cut = nxt + window
        for f in range(n):
            if alive[f] and ends[f] <= cut:
                alive[f] = False
                finish[f] = ends[f]
                left -= 1
        dt = nxt - now
        for f in range(n):
            if alive[f]:
                rem[f] -= rate[f] * dt
        now = nxt
    return finish


def _schedule_numpy(
    capacity: np.ndarray, paths: np.ndarray, nbytes: np.ndarray, window: float
) -> np.ndarray:
    rem = nbytes.astype(np.float64).copy()
    idx = np.arange(rem.size)
    finish = np.zeros(rem.size)
    now = 0.0
    while idx.size:
        p = paths[idx]
        live = p >= 0
        rate = max_min_rates(capacity, np.nonzero(live)[0], p[live], idx.size)
        ends = now + np.maximum(rem[idx], 0.0) / rate
        nxt = float(ends.min())
        batch = ends <= nxt + window
        finish[idx[batch]] = ends[batch]
        keep = ~batch
        rem[idx[keep]] -= rate[keep] * (nxt - now)
        idx = idx[keep]
        now = nxt
    return finish


def fluid_schedule(
    capacity: np.ndarray, paths: np.ndarray, nbytes: np.ndarray, window: float
) -> np.ndarray:
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
