"""The compiled max-min solver: progressive filling over a lazy heap of link shares.

The link with the smallest share (remaining capacity over unfrozen flows) is where its unfrozen
flows freeze, at that share; freezing them raises the shares of the other links they cross.
The heap is lazy: it holds, for every link, an entry no higher than the link's share; an entry
found below its link's share when it comes out is queued again at the share the link has now
(one push per such pop, not one per flow frozen), and a share that falls (by a rounding) is
queued at once, so links come out in the same order, at the same shares, as with an entry per
change. Every flow-link entry is touched once or twice: ``O(entries + pops x log links)``,
against one pass over all entries per round of the numpy solver
(:func:`moesim.timing.maxmin.max_min_rates_numpy`), which takes a hundred rounds on a skewed
256-GPU all-to-all. Compiled by numba on first use and
cached on disk (``cache=True``).
"""

from __future__ import annotations

import numpy as np
from numba import njit

# The scan (:func:`_scan`) is used when (links in use)^2 <= SCAN_RATIO x entries.
SCAN_RATIO = 4


@njit(cache=True)
def _before(keys: np.ndarray, ids: np.ndarray, a: int, b: int) -> bool:
    """Heap order: smaller share first, then smaller link id (a total order, so that the links
    of one transfer pop in the same order whatever else shares the call)."""
    return keys[a] < keys[b] or (keys[a] == keys[b] and ids[a] < ids[b])


@njit(cache=True)
def _push(keys: np.ndarray, ids: np.ndarray, size: int, key: float, link: int) -> int:
    i = size
    keys[i] = key
    ids[i] = link
    while i > 0:
        parent = (i - 1) >> 1
        if not _before(keys, ids, i, parent):
            break
        keys[parent], keys[i] = keys[i], keys[parent]
        ids[parent], ids[i] = ids[i], ids[parent]
        i = parent
    return size + 1


@njit(cache=True)
def _pop(keys: np.ndarray, ids: np.ndarray, size: int) -> int:
    size -= 1
    keys[0] = keys[size]
    ids[0] = ids[size]
    i = 0
    while True:
        left = 2 * i + 1
        if left >= size:
            break
        child = left
        if left + 1 < size and _before(keys, ids, left + 1, left):
            child = left + 1
        if not _before(keys, ids, child, i):
            break
        keys[child], keys[i] = keys[i], keys[child]
        ids[child], ids[i] = ids[i], ids[child]
        i = child
    return size


@njit(cache=True)
def fill(
    capacity: np.ndarray, flow_of: np.ndarray, link_of: np.ndarray, n_flows: int, how: int = 0
) -> np.ndarray:
    """``[n_flows]`` max-min rates; arguments as :func:`moesim.timing.maxmin.max_min_rates`
    (float64 capacity over every link id, int64 entries). ``how``: 0 chooses, 1 the heap,
    2 the scan (:func:`_scan`); both give the same rates bit for bit."""
    count, link_ptr, flow_ptr, by_link, by_flow = _csr(flow_of, link_of, n_flows, capacity.size)
    frozen = np.zeros(n_flows, np.bool_)
    return _solve(capacity, count, link_ptr, by_link, flow_ptr, by_flow, frozen, how)


@njit(cache=True)
def fluid_schedule(
    capacity: np.ndarray,
    flow_of: np.ndarray,
    link_of: np.ndarray,
    nbytes: np.ndarray,
    window: float,
) -> np.ndarray:
    """Finish time (seconds after the start) of every flow of one isolated transfer: max-min
    rates, then the earliest flow and every flow due within ``window`` after it retire, and
    again (the rule of :func:`moesim.timing.fluid_batch.batched_fluid_schedule`, whose
    arithmetic this follows step for step). Each round solves over the flows still alive,
    their entries kept in input order, so retired flows cost nothing (the rounds of a skewed
    1,024-GPU all-to-all see a quarter of the entries, summed, of what the first round sees
    times the rounds)."""
    n_flows = nbytes.size
    ids = np.arange(n_flows)  # original flow of each alive flow
    f_of = flow_of.astype(np.int64)
    l_of = link_of.astype(np.int64)
    rem = nbytes.astype(np.float64).copy()
    finish = np.zeros(n_flows)
    now = 0.0
    while ids.size > 0:
        m = ids.size
        count, link_ptr, flow_ptr, by_link, by_flow = _csr(f_of, l_of, m, capacity.size)
        none = np.zeros(m, np.bool_)
        rate = _solve(capacity, count, link_ptr, by_link, flow_ptr, by_flow, none, 0)
        ends = np.empty(m)
        first = np.inf
        for f in range(m):
            ends[f] = now + max(rem[f], 0.0) / rate[f]
            first = min(first, ends[f])
        keep = np.empty(m, np.bool_)
        new_id = np.empty(m, np.int64)
        kept = 0
        for f in range(m):
            keep[f] = ends[f] > first + window
            if keep[f]:
                rem[f] -= rate[f] * (first - now)
                new_id[f] = kept
                kept += 1
            else:
                finish[ids[f]] = ends[f]
        now = first
        ids, rem = ids[keep], rem[keep]
        live = keep[f_of]
        f_of, l_of = new_id[f_of[live]], l_of[live]
    return finish


@njit(cache=True)
def _csr(
    flow_of: np.ndarray, link_of: np.ndarray, n_flows: int, n_links: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Entries per link, the two offset arrays, and the entries grouped by link (their flows)
    and by flow (their links), each group in input order."""
    nnz = flow_of.size
    count = np.zeros(n_links, np.int64)
    per_flow = np.zeros(n_flows, np.int64)
    for e in range(nnz):
        count[link_of[e]] += 1
        per_flow[flow_of[e]] += 1
    link_ptr = np.zeros(n_links + 1, np.int64)
    flow_ptr = np.zeros(n_flows + 1, np.int64)
    for i in range(n_links):
        link_ptr[i + 1] = link_ptr[i] + count[i]
    for f in range(n_flows):
        flow_ptr[f + 1] = flow_ptr[f] + per_flow[f]
    by_link = np.empty(nnz, np.int64)  # flow of each entry, grouped by link
    by_flow = np.empty(nnz, np.int64)  # link of each entry, grouped by flow (input order)
    fill_l = link_ptr[:-1].copy()
    fill_f = flow_ptr[:-1].copy()
    for e in range(nnz):
        lk, fl = link_of[e], flow_of[e]
        by_link[fill_l[lk]] = fl
        fill_l[lk] += 1
        by_flow[fill_f[fl]] = lk
        fill_f[fl] += 1
    return count, link_ptr, flow_ptr, by_link, by_flow


@njit(cache=True)
def _solve(
    capacity: np.ndarray,
    count: np.ndarray,
    link_ptr: np.ndarray,
    by_link: np.ndarray,
    flow_ptr: np.ndarray,
    by_flow: np.ndarray,
    frozen: np.ndarray,
    how: int,
) -> np.ndarray:
    """Progressive filling over the flows not ``frozen`` (``count``: their entries per link);
    the heap or, when few links carry many entries, the scan (:func:`_scan`)."""
    n_links = capacity.size
    n_flows = frozen.size
    rem = capacity.astype(np.float64).copy()
    left = count.astype(np.float64)
    active = np.nonzero(count)[0]
    nnz = count.sum()
    if how == 2 or (how == 0 and active.size * active.size <= SCAN_RATIO * nnz):
        return _scan(rem, left, active, link_ptr, by_link, flow_ptr, by_flow, frozen)
    keys = np.empty(n_links + nnz + 1, np.float64)
    ids = np.empty(n_links + nnz + 1, np.int64)
    size = 0
    for lk in range(n_links):
        if count[lk] > 0:
            size = _push(keys, ids, size, max(rem[lk], 0.0) / left[lk], lk)
    rate = np.zeros(n_flows)
    frozen = frozen.copy()
    while size > 0:
        share, lk = keys[0], ids[0]
        size = _pop(keys, ids, size)
        if left[lk] <= 0:
            continue  # the link's flows are all frozen
        now = max(rem[lk], 0.0) / left[lk]
        if now != share:
            if share < now:  # its share rose since: queue it again at the share it has now
                size = _push(keys, ids, size, now, lk)
            continue  # (a share above the link's is an entry a lower one has overtaken)
        for e in range(link_ptr[lk], link_ptr[lk + 1]):
            fl = by_link[e]
            if frozen[fl]:
                continue
            frozen[fl] = True
            rate[fl] = share
            for e2 in range(flow_ptr[fl], flow_ptr[fl + 1]):
                other = by_flow[e2]
                if other == lk or left[other] <= 1.0:
                    rem[other] -= share
                    left[other] -= 1.0
                    continue
                before = max(rem[other], 0.0) / left[other]
                rem[other] -= share
                left[other] -= 1.0
                if max(rem[other], 0.0) / left[other] < before:  # fell (rounding): queue it
                    size = _push(keys, ids, size, max(rem[other], 0.0) / left[other], other)
    return rate


@njit(cache=True)
def _scan(
    rem: np.ndarray,
    left: np.ndarray,
    active: np.ndarray,
    link_ptr: np.ndarray,
    by_link: np.ndarray,
    flow_ptr: np.ndarray,
    by_flow: np.ndarray,
    frozen: np.ndarray,
) -> np.ndarray:
    """Progressive filling with the next link found by a scan of the links still in use,
    each link's share kept current: the heap's order exactly (smallest share, then smallest
    id), so the same rates bit for bit, and cheaper when few links carry many flows (a
    256-GPU all-to-all over its NICs: 512 links, 65k flows)."""
    share = np.full(rem.size, np.inf)
    for lk in active:
        share[lk] = max(rem[lk], 0.0) / left[lk]
    live = active.copy()
    n_live = live.size
    rate = np.zeros(frozen.size)
    frozen = frozen.copy()
    while n_live > 0:
        best = 0
        for i in range(1, n_live):
            a, b = live[i], live[best]
            if share[a] < share[b] or (share[a] == share[b] and a < b):
                best = i
        lk = live[best]
        level = share[lk]
        for e in range(link_ptr[lk], link_ptr[lk + 1]):
            fl = by_link[e]
            if frozen[fl]:
                continue
            frozen[fl] = True
            rate[fl] = level
            for e2 in range(flow_ptr[fl], flow_ptr[fl + 1]):
                other = by_flow[e2]
                rem[other] -= level
                left[other] -= 1.0
                share[other] = max(rem[other], 0.0) / left[other] if left[other] > 0 else np.inf
        # Drop the links with no unfrozen flow left (this one among them).
        kept = 0
        for i in range(n_live):
            if left[live[i]] > 0:
                live[kept] = live[i]
                kept += 1
        n_live = kept
    return rate
