"""Compiled per-link processor sharing (:mod:`moesim.timing.sharing`), and the whole of an
isolated phase in one pass (numba; imported on first use, cached on disk).

A flow of ``b`` bytes is through a link at ``(bytes of its smaller flows + b x flows of at
least b) / capacity``: the same time for the flows of one size. When every size is a whole
number of bytes (an all-to-all's are tokens times a token's bytes) and there are few of them
(in units of their greatest common divisor), each link's histogram of sizes gives those
times: two passes over the flow-link entries, where sorting each link's flows took
``links x k log k`` (5 ms against 1 on a 256-GPU decode dispatch). Other sizes are sorted
link by link. The smaller flows' bytes are sums of whole numbers, exact in both.
"""

from __future__ import annotations

import numpy as np
from numba import njit

_EXACT = 2.0**53  # sizes below this are whole numbers exactly when they look like it


@njit(cache=True)
def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


@njit(cache=True)
def _units(nbytes: np.ndarray) -> tuple[np.ndarray, int]:
    """Each size in units of the sizes' greatest common divisor, and that unit, when every
    size is a whole number of bytes (else an empty array)."""
    unit = 0
    for f in range(nbytes.size):
        b = nbytes[f]
        if b < 0 or b >= _EXACT or b != np.floor(b):
            return np.empty(0, np.int64), 0
        if unit == 0 or int(b) % unit:
            unit = _gcd(int(b), unit)
    key = np.zeros(nbytes.size, np.int64)
    if unit > 0:
        for f in range(nbytes.size):
            key[f] = int(nbytes[f] / unit + 0.5)  # exact: whole quotients
    return key, unit


@njit(cache=True)
def _by_histogram(
    capacity: np.ndarray,
    flow_of: np.ndarray,
    link_of: np.ndarray,
    key: np.ndarray,
    unit: int,
    keys: int,
) -> np.ndarray:
    """``[flows]`` finish times from each link's histogram of sizes (``keys`` distinct
    sizes in ``unit`` bytes): the flows of one size on a link are through it together."""
    n_links = capacity.size
    hist = np.zeros(n_links * keys, np.int64)
    count = np.zeros(n_links, np.int64)
    for e in range(flow_of.size):
        hist[link_of[e] * keys + key[flow_of[e]]] += 1
        count[link_of[e]] += 1
    through = _through(capacity, hist, count, unit, keys)
    finish = np.zeros(key.size)
    for e in range(flow_of.size):
        f = flow_of[e]
        t = through[link_of[e] * keys + key[f]]
        if t > finish[f]:
            finish[f] = t
    return finish


@njit(cache=True)
def _through(
    capacity: np.ndarray, hist: np.ndarray, count: np.ndarray, unit: int, keys: int
) -> np.ndarray:
    """``[links x keys]`` when a link's flows of each size (``hist``: how many, ``count``:
    flows per link) are through it."""
    through = np.empty(capacity.size * keys)
    for link in range(capacity.size):
        if count[link] == 0:
            continue
        acc = 0.0  # bytes of the smaller flows (whole numbers: exact)
        below = 0
        for r in range(keys):
            c = hist[link * keys + r]
            if c:
                size = float(r * unit)
                through[link * keys + r] = (acc + size * (count[link] - below)) / capacity[link]
                acc += c * size
                below += c
    return through


@njit(cache=True)
def _by_sort(
    capacity: np.ndarray, flow_of: np.ndarray, link_of: np.ndarray, nbytes: np.ndarray
) -> np.ndarray:
    """``[flows]`` finish times with each link's flows sorted by size."""
    n_links, nnz = capacity.size, flow_of.size
    ptr = np.zeros(n_links + 1, np.int64)
    for e in range(nnz):
        ptr[link_of[e] + 1] += 1
    for i in range(n_links):
        ptr[i + 1] += ptr[i]
    flows = np.empty(nnz, np.int64)
    fill = ptr[:-1].copy()
    for e in range(nnz):
        flows[fill[link_of[e]]] = flow_of[e]
        fill[link_of[e]] += 1
    for link in range(n_links):
        a, b = ptr[link], ptr[link + 1]
        if b - a > 1:
            group = flows[a:b].copy()
            order = np.argsort(nbytes[group], kind="mergesort")
            for i in range(b - a):
                flows[a + i] = group[order[i]]
    return _share(capacity, ptr, flows, nbytes)


@njit(cache=True)
def _finish(
    capacity: np.ndarray, flow_of: np.ndarray, link_of: np.ndarray, nbytes: np.ndarray
) -> np.ndarray:
    """``[flows]`` the latest time each flow is through a link of its path (0 for none): by
    histograms where the sizes are few whole multiples of one unit, else by sorting."""
    key, unit = _units(nbytes)
    if key.size:
        keys = key.max() + 1
        if keys * capacity.size <= 4 * flow_of.size + 65536:
            return _by_histogram(capacity, flow_of, link_of, key, unit, keys)
    return _by_sort(capacity, flow_of, link_of, nbytes)


@njit(cache=True)
def _share(
    capacity: np.ndarray, ptr: np.ndarray, flows: np.ndarray, nbytes: np.ndarray
) -> np.ndarray:
    """``[flows]`` the latest time each flow is through a link of its path (0 for none)."""
    finish = np.zeros(nbytes.size)
    for link in range(capacity.size):
        a, b = ptr[link], ptr[link + 1]
        k = b - a
        acc = 0.0  # bytes of the flows smaller than the current run of equal sizes
        i = 0
        while i < k:
            s = nbytes[flows[a + i]]
            t = (acc + s * (k - i)) / capacity[link]
            j = i
            while j < k and nbytes[flows[a + j]] == s:
                f = flows[a + j]
                if t > finish[f]:
                    finish[f] = t
                acc += s
                j += 1
            i = j
    return finish


@njit(cache=True)
def link_sharing(
    capacity: np.ndarray, flow_of: np.ndarray, link_of: np.ndarray, nbytes: np.ndarray
) -> np.ndarray:
    """Per-link processor sharing, compiled: the rule of
    :func:`moesim.timing.sharing.link_sharing_numpy` (the two sum the smaller flows' bytes in
    different orders: within 1e-12)."""
    return _finish(capacity, flow_of, link_of, nbytes.astype(np.float64))


@njit(cache=True)
def isolated_phase(
    table: np.ndarray,
    latency: np.ndarray,
    at: np.ndarray,
    src: np.ndarray,
    dst: np.ndarray,
    nbytes: np.ndarray,
    capacity: np.ndarray,
    implied: np.ndarray,
    now: float,
    gpus: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An isolated transfer started at ``now``, by per-link processor sharing, in one pass
    (:meth:`moesim.timing.network.FlowNetwork.isolated_done`).

    Args:
        table: ``[a, b, hops]`` link ids of flow ``f``'s path at ``[at[0, f], at[1, f]]``
            (-1 padded): the cluster's pair table indexed by GPUs, or one row of paths.
        latency: ``[a, b]`` path latencies, seconds, indexed alike.
        at: ``[2, n]`` each flow's indices into ``table`` and ``latency``.
        src / dst: ``[n]`` the flows' GPUs.
        nbytes: ``[n]`` bytes (float64).
        capacity: ``[links]`` bytes per second.
        implied: ``[links]`` links that never bind (their bytes are counted, not shared).
        now: Start time.
        gpus: GPUs in the cluster.

    Returns:
        ``done`` (``[gpus]`` when each GPU's flows have all arrived: ``now + finish +
        latency`` at the latest, ``now`` for a GPU without flows), ``ends`` (``[gpus]``
        sends or receives a flow that crosses a link) and ``load`` (``[links]`` bytes).
    """
    n, hops, n_links = src.size, table.shape[2], capacity.size
    key, unit = _units(nbytes)
    keys = key.max() + 1 if key.size else 0
    if keys and keys * n_links <= 4 * n * hops + 65536:
        finish, routed, load = _phase_by_histogram(
            table, at, nbytes, capacity, implied, key, unit, keys
        )
    else:
        load = np.zeros(n_links)
        routed = np.zeros(n, np.bool_)
        flow_of = np.empty(n * hops, np.int64)
        link_of = np.empty(n * hops, np.int64)
        nnz = 0
        for f in range(n):
            for h in range(hops):
                link = table[at[0, f], at[1, f], h]
                if link >= 0:
                    routed[f] = True
                    load[link] += nbytes[f]
                    if not implied[link]:
                        flow_of[nnz] = f
                        link_of[nnz] = link
                        nnz += 1
        finish = _by_sort(capacity, flow_of[:nnz], link_of[:nnz], nbytes)
    done = np.full(gpus, now)
    ends = np.zeros(gpus, np.bool_)
    for f in range(n):
        if routed[f]:
            arrive = now + finish[f] + latency[at[0, f], at[1, f]]
            done[src[f]] = max(done[src[f]], arrive)
            done[dst[f]] = max(done[dst[f]], arrive)
            ends[src[f]] = ends[dst[f]] = True
    return done, ends, load


@njit(cache=True)
def _phase_by_histogram(
    table: np.ndarray,
    at: np.ndarray,
    nbytes: np.ndarray,
    capacity: np.ndarray,
    implied: np.ndarray,
    key: np.ndarray,
    unit: int,
    keys: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`isolated_phase`'s finish times (``[n]``), flows that cross a link and bytes
    per link, by the links' histograms of sizes (:func:`_by_histogram`) read straight from
    the path table."""
    n, hops, n_links = at.shape[1], table.shape[2], capacity.size
    load = np.zeros(n_links)
    routed = np.zeros(n, np.bool_)
    hist = np.zeros(n_links * keys, np.int64)
    count = np.zeros(n_links, np.int64)
    for f in range(n):
        for h in range(hops):
            link = table[at[0, f], at[1, f], h]
            if link >= 0:
                routed[f] = True
                load[link] += nbytes[f]
                if not implied[link]:
                    hist[link * keys + key[f]] += 1
                    count[link] += 1
    through = _through(capacity, hist, count, unit, keys)
    finish = np.zeros(n)
    for f in range(n):
        for h in range(hops):
            link = table[at[0, f], at[1, f], h]
            if link >= 0 and not implied[link]:
                finish[f] = max(finish[f], through[link * keys + key[f]])
    return finish, routed, load
