"""Max-min fair rates of flows sharing links, on arrays.

Flows and links are given as a sparse incidence in coordinate form: entry ``i`` says flow
``flow_of[i]`` crosses link ``link_of[i]``.

Progressive filling grows every unfrozen flow at one rate until some link is full and freezes
that link's flows; it needs one round per distinct rate (hundreds on a skewed 256-GPU
all-to-all). This module freezes many links per round instead. A link's *share* is its
remaining capacity over its unfrozen flows; shares never fall during the filling (a flow
freezes at the smallest share, at most the share of every link it crosses). So a link whose
share is no larger than the share of any link its unfrozen flows cross (a *local* bottleneck)
is where those flows freeze, at that share, whatever happens elsewhere; every round freezes
all local bottlenecks at once, and the global smallest share is always one of them. The
result is the same unique max-min allocation; rounds are the depth of the bottleneck chain
(a few) instead of the number of distinct rates.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moesim.jit import kernel

SATURATED = 1e-9
COMPILED_MIN_GPUS = 64
"""Networks of this many GPUs or more use the compiled solver (smaller ones solve in well
under the half second numba takes to load)."""
_TIE = 1e-12  # relative: shares this close are equal


def max_min_rates(
    capacity: np.ndarray,
    flow_of: np.ndarray,
    link_of: np.ndarray,
    n_flows: int,
    tolerance: float = 0.0,
    compiled: bool = True,
) -> np.ndarray:
    """Max-min fair rate of every flow: the compiled solver (:mod:`moesim.timing._maxmin_jit`)
    with ``compiled`` where numba is installed and ``tolerance`` is 0, else
    :func:`max_min_rates_numpy`.

    Both are exact; they differ by float rounding only (within 1e-11 relative: the order in
    which frozen rates are subtracted from a link, and links whose shares tie within 1e-12).
    The compiled one costs about half a second to load once per process (numba), so a network
    chooses one for its lifetime (:data:`COMPILED_MIN_GPUS`): the same solver for every call
    keeps a run's results independent of how its transfers are batched.
    """
    fill = _compiled() if compiled and tolerance == 0.0 else None
    if fill is None:
        return max_min_rates_numpy(capacity, flow_of, link_of, n_flows, tolerance)
    return fill(
        np.asarray(capacity, dtype=np.float64),
        np.asarray(flow_of, dtype=np.int64),
        np.asarray(link_of, dtype=np.int64),
        int(n_flows),
    )


def compiled_schedule() -> Any:
    """The compiled fluid schedule of one isolated transfer
    (:func:`moesim.timing._maxmin_jit.fluid_schedule`), or None without numba."""
    return kernel("moesim.timing._maxmin_jit", "fluid_schedule")


def compiled_sharing() -> Any:
    """The compiled per-link processor sharing of one isolated transfer
    (:func:`moesim.timing._sharing_jit.link_sharing`), or None without numba."""
    return kernel("moesim.timing._sharing_jit", "link_sharing")


def compiled_phase() -> Any:
    """A whole isolated phase by per-link processor sharing, compiled
    (:func:`moesim.timing._phase_jit.isolated_phase`), or None without numba."""
    return kernel("moesim.timing._phase_jit", "isolated_phase")


def compiled_pairs() -> Any:
    """A whole isolated phase of a count matrix's flows, compiled
    (:func:`moesim.timing._phase_jit.isolated_pairs`), or None without numba."""
    return kernel("moesim.timing._phase_jit", "isolated_pairs")


def _compiled() -> Any:
    """The compiled progressive filling, or None without numba (the numpy solver then)."""
    return kernel("moesim.timing._maxmin_jit", "fill")


def max_min_rates_numpy(
    capacity: np.ndarray,
    flow_of: np.ndarray,
    link_of: np.ndarray,
    n_flows: int,
    tolerance: float = 0.0,
) -> np.ndarray:
    """Max-min fair rate of every flow, on numpy arrays (local bottlenecks, see the module).

    Args:
        capacity: ``[links]`` float64, bytes per second of each link.
        flow_of: ``[nnz]`` int64, the flow of each incidence entry.
        link_of: ``[nnz]`` int64, the link of each incidence entry.
        n_flows: Number of flows (every flow must cross at least one link).

    Returns:
        ``[n_flows]`` float64 rates in bytes per second.
    """
    links, lk = np.unique(link_of, return_inverse=True)
    remaining = capacity[links].astype(np.float64)
    count = np.bincount(lk, minlength=links.size).astype(np.float64)
    rate = np.zeros(n_flows)
    f = np.asarray(flow_of)
    while f.size:
        with np.errstate(divide="ignore", invalid="ignore"):
            share = np.where(count > 0, np.maximum(remaining, 0.0) / count, np.inf)
        entry_share = share[lk]
        flow_min = np.full(n_flows, np.inf)
        np.minimum.at(flow_min, f, entry_share)  # each flow's tightest link
        link_min = np.full(links.size, np.inf)
        np.minimum.at(link_min, lk, flow_min[f])  # tightest link any of its flows cross
        local = share <= link_min * (1 + max(tolerance, _TIE))
        hit = local[lk]
        frozen = np.zeros(n_flows, dtype=bool)
        frozen[f[hit]] = True
        rate[frozen] = flow_min[frozen]
        done = frozen[f]
        remaining -= np.bincount(lk[done], weights=rate[f[done]], minlength=links.size)
        count -= np.bincount(lk[done], minlength=links.size)
        f, lk = f[~done], lk[~done]
    return rate
