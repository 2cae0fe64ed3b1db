"""A whole isolated phase in one compiled call (numba; imported on first use, cached on
disk): paths read from the cluster's pair table, every link's bytes and per-link processor
sharing (:mod:`moesim.timing._sharing_jit`: each link's histogram of sizes where they are few
whole multiples of one unit, else a sort per link), every flow's arrival, every GPU's last
one and the phase's byte counts, with no array a flow long on the histogram path. Its two
passes over the flows run on chunks of them, in parallel from :data:`PARALLEL_MIN_FLOWS`
(fixed chunks: the bytes are whole numbers, so the chunks' sums are exactly one pass's, on
any number of threads). :func:`isolated_pairs` takes a pairwise all-to-all's count matrix
instead of its flows (a row's flows at a time in small buffers, through the same passes).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from moesim.timing._sharing_jit import (
    by_sort,
    histograms_fit,
    size_key,
    through_times,
    unit_with,
    whole_unit,
)

_CHUNKS = 4  # flows are split into this many chunks for the threads (fixed: the same sums)
PARALLEL_MIN_FLOWS = 8192
"""Phases of this many flows or more run their passes in parallel chunks."""


@njit(cache=True)
def isolated_phase(
    table: np.ndarray,
    latency: np.ndarray,
    src: np.ndarray,
    dst: np.ndarray,
    nbytes: np.ndarray,
    capacity: np.ndarray,
    implied: np.ndarray,
    now: float,
    gpus: int,
    rows: bool,
    gpn: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """An isolated transfer started at ``now``, by per-link processor sharing, in one pass
    (:meth:`moesim.timing.network.FlowNetwork.isolated`).

    Args:
        table: ``[a, b, hops]`` link ids of each flow's path (-1 padded): the cluster's pair
            table, at ``[src, dst]``, or with ``rows`` one row of the flows' paths, at
            ``[0, flow]``.
        latency: ``[a, b]`` path latencies, seconds, indexed alike.
        src / dst: ``[n]`` the flows' GPUs.
        nbytes: ``[n]`` bytes (float64).
        capacity: ``[links]`` bytes per second.
        implied: ``[links]`` links that never bind (their bytes are counted, not shared).
        now: Start time.
        gpus: GPUs in the cluster.
        rows: How ``table`` is indexed (above).
        gpn: GPUs per node.

    Returns:
        ``done`` (``[gpus]`` when each GPU's flows have all arrived: ``now + finish +
        latency`` at the latest, ``now`` for a GPU without flows), ``ends`` (``[gpus]``
        sends or receives a flow that crosses a link), ``load`` (``[links]`` bytes),
        ``sent`` (``[gpus]`` bytes each GPU sends to another) and ``moved`` (bytes between
        nodes, bytes within nodes, a GPU's copies to itself left out).
    """
    n, n_links = src.size, capacity.size
    a0, a1 = (np.zeros(n, np.int64), np.arange(n)) if rows else (src, dst)  # table indices
    chunks = _CHUNKS if n >= PARALLEL_MIN_FLOWS else 1
    size = (n + chunks - 1) // chunks
    done = np.full((chunks, gpus), now)
    ended = np.zeros((chunks, gpus), np.bool_)
    sent = np.zeros((chunks, gpus))
    moved = np.zeros((chunks, 2))
    unit, top = whole_unit(nbytes)
    keys = top + 1
    if unit < 0 or not histograms_fit(keys, n_links, n * table.shape[2]):
        finish, routed, load = _phaseby_sort(table, a0, a1, nbytes, capacity, implied)
        for f in range(n):
            if routed[f]:
                _arrive(now + finish[f] + latency[a0[f], a1[f]], src[f], dst[f], done[0], ended[0])
            _sent(src[f], dst[f], nbytes[f], gpn, sent[0], moved[0])
        return done[0], ended[0], load, sent[0], moved[0]
    # by the links' histograms of sizes, read straight from the path table, with no array a
    # flow long: the flows in chunks (in parallel from PARALLEL_MIN_FLOWS; their bytes are
    # whole numbers, so the chunks' sums add up exactly: the same loads as one pass)
    loads = np.zeros((chunks, n_links))
    hists = np.zeros((chunks, n_links * keys), np.int32)
    args = (table, a0, a1, nbytes, implied, unit, keys)
    if chunks > 1:
        _count_chunks(size, *args, loads, hists)
    else:
        _count_chunk(0, n, *args, loads[0], hists[0])
    load, hist = _summed(loads, hists)
    through = through_times(capacity, hist, unit, keys)
    args2 = (*args, through, latency, src, dst, now, gpn)
    if chunks > 1:
        _arrive_chunks(size, *args2, done, ended, sent, moved)
    else:
        _arrive_chunk(0, n, *args2, done[0], ended[0], sent[0], moved[0])
    latest, ends, sent_all, moved_all = _latest(done, ended, sent, moved)
    return latest, ends, load, sent_all, moved_all


@njit(cache=True)
def _summed(loads: np.ndarray, hists: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The chunks' bytes per link and histograms, added up (whole numbers of bytes: exact in
    any order, so the same as one pass)."""
    load = loads[0].copy()
    hist = hists[0].astype(np.int64)
    for c in range(1, loads.shape[0]):
        load += loads[c]
        hist += hists[c]
    return load, hist


@njit(cache=True)
def _latest(
    done: np.ndarray, ended: np.ndarray, sent: np.ndarray, moved: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The chunks' arrivals and byte counts put together: every GPU's latest arrival, whether
    a flow ends there, bytes sent (whole numbers: exact in any order) and moved."""
    latest, ends = done[0].copy(), ended[0].copy()
    total_sent, total_moved = sent[0].copy(), moved[0].copy()
    for c in range(1, done.shape[0]):
        for g in range(done.shape[1]):
            latest[g] = max(latest[g], done[c, g])
            ends[g] |= ended[c, g]
        total_sent += sent[c]
        total_moved += moved[c]
    return latest, ends, total_sent, total_moved


@njit(cache=True)
def _arrive(at: float, s: int, d: int, done: np.ndarray, ends: np.ndarray) -> None:
    """A flow from GPU ``s`` to ``d`` arrives ``at``."""
    done[s] = max(done[s], at)
    done[d] = max(done[d], at)
    ends[s] = ends[d] = True


@njit(cache=True)
def _sent(s: int, d: int, b: float, gpn: int, sent: np.ndarray, moved: np.ndarray) -> None:
    """A flow of ``b`` bytes from GPU ``s`` to ``d`` in the byte counts (not to itself)."""
    if s != d:
        sent[s] += b
        moved[0 if s // gpn != d // gpn else 1] += b


@njit(cache=True)
def _phaseby_sort(
    table: np.ndarray,
    a0: np.ndarray,
    a1: np.ndarray,
    nbytes: np.ndarray,
    capacity: np.ndarray,
    implied: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`isolated_phase`'s finish times (``[n]``), flows that cross a link and bytes
    per link, sorting each link's flows (:func:`_by_sort`)."""
    n, hops, n_links = a0.size, table.shape[2], capacity.size
    load = np.zeros(n_links)
    routed = np.zeros(n, np.bool_)
    flow_of = np.empty(n * hops, np.int64)
    link_of = np.empty(n * hops, np.int64)
    nnz = 0
    for f in range(n):
        for h in range(hops):
            link = table[a0[f], a1[f], h]
            if link >= 0:
                routed[f] = True
                load[link] += nbytes[f]
                if not implied[link]:
                    flow_of[nnz] = f
                    link_of[nnz] = link
                    nnz += 1
    return by_sort(capacity, flow_of[:nnz], link_of[:nnz], nbytes), routed, load


# The histogram path's two passes over the flows, a chunk at a time; in parallel from
# PARALLEL_MIN_FLOWS flows (a parallel region costs ~15 us to start: more than a small
# phase's whole pass).
@njit(cache=True)
def _count_chunk(
    lo: int,
    hi: int,
    table: np.ndarray,
    a0: np.ndarray,
    a1: np.ndarray,
    nbytes: np.ndarray,
    implied: np.ndarray,
    unit: int,
    keys: int,
    load: np.ndarray,
    hist: np.ndarray,
) -> None:
    """Flows ``lo`` to ``hi``: bytes per link, and each link's histogram of sizes."""
    for f in range(lo, hi):
        key = size_key(nbytes[f], unit)
        for h in range(table.shape[2]):
            link = table[a0[f], a1[f], h]
            if link >= 0:
                load[link] += nbytes[f]
                if not implied[link]:
                    hist[link * keys + key] += 1


@njit(cache=True, parallel=True)
def _count_chunks(
    size: int,
    table: np.ndarray,
    a0: np.ndarray,
    a1: np.ndarray,
    nbytes: np.ndarray,
    implied: np.ndarray,
    unit: int,
    keys: int,
    loads: np.ndarray,
    hists: np.ndarray,
) -> None:
    n = a0.size
    for c in prange(loads.shape[0]):
        lo, hi = c * size, min(n, (c + 1) * size)
        _count_chunk(lo, hi, table, a0, a1, nbytes, implied, unit, keys, loads[c], hists[c])


@njit(cache=True)
def _arrive_chunk(
    lo: int,
    hi: int,
    table: np.ndarray,
    a0: np.ndarray,
    a1: np.ndarray,
    nbytes: np.ndarray,
    implied: np.ndarray,
    unit: int,
    keys: int,
    through: np.ndarray,
    latency: np.ndarray,
    src: np.ndarray,
    dst: np.ndarray,
    now: float,
    gpn: int,
    done: np.ndarray,
    ends: np.ndarray,
    sent: np.ndarray,
    moved: np.ndarray,
) -> None:
    """Flows ``lo`` to ``hi``: each is through its path at the latest of its links' times,
    and arrives a path latency later; their bytes counted."""
    for f in range(lo, hi):
        key = size_key(nbytes[f], unit)
        finish = 0.0
        routed = False
        for h in range(table.shape[2]):
            link = table[a0[f], a1[f], h]
            if link >= 0:
                routed = True
                if not implied[link]:
                    finish = max(finish, through[link * keys + key])
        if routed:
            _arrive(now + finish + latency[a0[f], a1[f]], src[f], dst[f], done, ends)
        _sent(src[f], dst[f], nbytes[f], gpn, sent, moved)


@njit(cache=True, parallel=True)
def _arrive_chunks(
    size: int,
    table: np.ndarray,
    a0: np.ndarray,
    a1: np.ndarray,
    nbytes: np.ndarray,
    implied: np.ndarray,
    unit: int,
    keys: int,
    through: np.ndarray,
    latency: np.ndarray,
    src: np.ndarray,
    dst: np.ndarray,
    now: float,
    gpn: int,
    done: np.ndarray,
    ends: np.ndarray,
    sent: np.ndarray,
    moved: np.ndarray,
) -> None:
    n = a0.size
    for c in prange(done.shape[0]):
        lo, hi = c * size, min(n, (c + 1) * size)
        args = (table, a0, a1, nbytes, implied, unit, keys, through, latency, src, dst, now, gpn)
        _arrive_chunk(lo, hi, *args, done[c], ends[c], sent[c], moved[c])


@njit(cache=True)
def isolated_pairs(
    table: np.ndarray,
    latency: np.ndarray,
    counts: np.ndarray,
    src_gpu: np.ndarray,
    dst_gpu: np.ndarray,
    tb: float,
    own: bool,
    reverse: bool,
    capacity: np.ndarray,
    implied: np.ndarray,
    now: float,
    gpus: int,
    gpn: int,
) -> tuple[bool, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`isolated_phase` of the flows of a count matrix, without building them: a flow
    of ``counts[s, d] * tb`` bytes from ``src_gpu[s]`` to ``dst_gpu[d]`` for each non-zero
    entry (a GPU's entry to itself only with ``own``: :func:`moesim.comm.alltoall._pairs`),
    in the opposite direction with ``reverse``, read from the cluster's pair table a row at a
    time. Only the histogram path (whole sizes, few of them); the first value says whether
    it applied (else the caller builds the flows)."""
    rows, cols = counts.shape
    n_links = capacity.size
    unit, largest = 0, 0.0
    for s in range(rows):
        for d in range(cols):
            c = counts[s, d]
            if c != 0 and (own or src_gpu[s] != dst_gpu[d]) and unit >= 0:
                unit = unit_with(c * tb, unit)
                largest = max(largest, c * tb)
    keys = size_key(largest, unit) + 1 if unit >= 0 else 0
    empty = np.zeros(0)
    if unit < 0 or not histograms_fit(keys, n_links, rows * cols * table.shape[2]):
        return False, empty, np.zeros(0, np.bool_), empty, empty, empty
    chunks = _CHUNKS if rows * cols >= PARALLEL_MIN_FLOWS else 1
    size = (rows + chunks - 1) // chunks
    loads = np.zeros((chunks, n_links))
    hists = np.zeros((chunks, n_links * keys), np.int32)
    done = np.full((chunks, gpus), now)
    ended = np.zeros((chunks, gpus), np.bool_)
    sent = np.zeros((chunks, gpus))
    moved = np.zeros((chunks, 2))
    through = np.zeros(0)
    load = np.zeros(n_links)
    for step in range(2):  # count, then (with every link's times) arrive
        if step == 1:
            load, hist = _summed(loads, hists)
            through = through_times(capacity, hist, unit, keys)
        args = (table, latency, counts, src_gpu, dst_gpu, tb, own, reverse, implied, unit, keys)
        out = (loads, hists, through, now, gpn, done, ended, sent, moved)
        if chunks > 1:
            _rows_chunks(step, size, *args, *out)
        else:
            _rows(step, 0, rows, *args, loads[0], hists[0], through, now, gpn, done[0],
                  ended[0], sent[0], moved[0])  # fmt: skip
    latest, ends, sent_all, moved_all = _latest(done, ended, sent, moved)
    return True, latest, ends, load, sent_all, moved_all


@njit(cache=True)
def _rows(
    step: int,
    lo: int,
    hi: int,
    table: np.ndarray,
    latency: np.ndarray,
    counts: np.ndarray,
    src_gpu: np.ndarray,
    dst_gpu: np.ndarray,
    tb: float,
    own: bool,
    reverse: bool,
    implied: np.ndarray,
    unit: int,
    keys: int,
    load: np.ndarray,
    hist: np.ndarray,
    through: np.ndarray,
    now: float,
    gpn: int,
    done: np.ndarray,
    ends: np.ndarray,
    sent: np.ndarray,
    moved: np.ndarray,
) -> None:
    """Rows ``lo`` to ``hi`` of :func:`isolated_pairs`' matrix, a row's flows at a time in
    small buffers through :func:`_count_chunk` (``step`` 0) or :func:`_arrive_chunk` (1)."""
    cols = counts.shape[1]
    a0 = np.empty(cols, np.int64)
    a1 = np.empty(cols, np.int64)
    nbytes = np.empty(cols)
    for s in range(lo, hi):
        m = 0
        for d in range(cols):
            c = counts[s, d]
            if c != 0 and (own or src_gpu[s] != dst_gpu[d]):
                a0[m], a1[m] = (dst_gpu[d], src_gpu[s]) if reverse else (src_gpu[s], dst_gpu[d])
                nbytes[m] = c * tb
                m += 1
        if step == 0:
            _count_chunk(0, m, table, a0, a1, nbytes, implied, unit, keys, load, hist)
        else:
            args = (table, a0, a1, nbytes, implied, unit, keys, through, latency, a0, a1, now)
            _arrive_chunk(0, m, *args, gpn, done, ends, sent, moved)


@njit(cache=True, parallel=True)
def _rows_chunks(
    step: int,
    size: int,
    table: np.ndarray,
    latency: np.ndarray,
    counts: np.ndarray,
    src_gpu: np.ndarray,
    dst_gpu: np.ndarray,
    tb: float,
    own: bool,
    reverse: bool,
    implied: np.ndarray,
    unit: int,
    keys: int,
    loads: np.ndarray,
    hists: np.ndarray,
    through: np.ndarray,
    now: float,
    gpn: int,
    done: np.ndarray,
    ends: np.ndarray,
    sent: np.ndarray,
    moved: np.ndarray,
) -> None:
    rows = counts.shape[0]
    for c in prange(loads.shape[0]):
        lo, hi = c * size, min(rows, (c + 1) * size)
        args = (table, latency, counts, src_gpu, dst_gpu, tb, own, reverse, implied, unit, keys)
        _rows(step, lo, hi, *args, loads[c], hists[c], through, now, gpn, done[c], ends[c],
              sent[c], moved[c])  # fmt: skip
