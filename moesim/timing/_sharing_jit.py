"""Compiled per-link processor sharing (:mod:`moesim.timing.sharing`; numba, imported on
first use, cached on disk); the whole of an isolated phase in one call builds on it
(:mod:`moesim.timing._phase_jit`).

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
def unit_with(b: float, unit: int) -> int:
    """The greatest common divisor of ``unit`` (0: none yet) and a size ``b``, or -1 when
    ``b`` is not a whole number of bytes (then no unit)."""
    if b < 0 or b >= _EXACT or b != np.floor(b):
        return -1
    return _gcd(int(b), unit) if unit == 0 or int(b) % unit else unit


@njit(cache=True)
def whole_unit(nbytes: np.ndarray) -> tuple[int, int]:
    """The sizes' greatest common divisor and the largest size in that unit, when every size
    is a whole number of bytes (``(0, 0)`` when all are 0); ``(-1, 0)`` else."""
    unit = 0
    for f in range(nbytes.size):
        unit = unit_with(nbytes[f], unit)
        if unit < 0:
            return -1, 0
    top = 0
    for f in range(nbytes.size):
        top = max(top, size_key(nbytes[f], unit))
    return unit, top


@njit(cache=True)
def size_key(b: float, unit: int) -> int:
    """A whole size ``b`` in ``unit`` bytes (exact: a whole quotient)."""
    return int(b / unit + 0.5) if unit > 0 else 0


@njit(cache=True)
def histograms_fit(keys: int, links: int, entries: int) -> bool:
    """Whether ``links`` histograms of ``keys`` sizes cost no more than the flow-link
    ``entries`` they count (else sorting each link's flows is cheaper)."""
    return keys * links <= 4 * entries + 65536


@njit(cache=True)
def _by_histogram(
    capacity: np.ndarray,
    flow_of: np.ndarray,
    link_of: np.ndarray,
    sizes: np.ndarray,
    unit: int,
    keys: int,
) -> np.ndarray:
    """``[flows]`` finish times from each link's histogram of sizes (``sizes``: each flow's
    in ``unit`` bytes, fewer than ``keys``): the flows of one size on a link are through it
    together."""
    n_links = capacity.size
    hist = np.zeros(n_links * keys, np.int64)
    for e in range(flow_of.size):
        hist[link_of[e] * keys + sizes[flow_of[e]]] += 1
    through = through_times(capacity, hist, unit, keys)
    finish = np.zeros(sizes.size)
    for e in range(flow_of.size):
        f = flow_of[e]
        t = through[link_of[e] * keys + sizes[f]]
        if t > finish[f]:
            finish[f] = t
    return finish


@njit(cache=True)
def through_times(capacity: np.ndarray, hist: np.ndarray, unit: int, keys: int) -> np.ndarray:
    """``[links x keys]`` when a link's flows of each size (``hist``: how many) are through
    it."""
    through = np.empty(capacity.size * keys)
    count = np.zeros(capacity.size, np.int64)
    for link in range(capacity.size):
        for r in range(keys):
            count[link] += hist[link * keys + r]
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
def by_sort(
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
    unit, top = whole_unit(nbytes)
    if unit >= 0 and histograms_fit(top + 1, capacity.size, flow_of.size):
        sizes = np.empty(nbytes.size, np.int64)
        for f in range(nbytes.size):
            sizes[f] = size_key(nbytes[f], unit)
        return _by_histogram(capacity, flow_of, link_of, sizes, unit, top + 1)
    return by_sort(capacity, flow_of, link_of, nbytes)


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
