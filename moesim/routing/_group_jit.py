"""Compiled group-limited top-k draw (numba; imported on first use, cached on disk).

The same order-statistics draw as :func:`moesim.routing.sources.group_limited_topk`, one
token at a time with nothing in memory but that token's ``[groups, m]`` depths: numpy's
version spends its time building, partitioning and gathering ``[n, groups, m]`` arrays. The
random numbers are drawn by the caller (numpy's generator, so the stream is the seed's), in a
fixed layout: every group's ``m`` exponential gaps, and one uniform per pick for its expert
inside its group (the ``j``-th untaken one of the group's experts: sampling without
replacement). Ties (of float32 depths or float64 group scores) go to the lower index.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from moesim.routing._acklam import _A, _B, _C, _D


@njit(cache=True)
def _half_normal(depth: float) -> float:
    """``-ppf((1 - exp(-depth)) / 2)`` by Acklam's approximation (as the numpy version)."""
    p = -np.expm1(-depth) / 2.0
    if p < 0.02425:
        q = np.sqrt(-2.0 * np.log(max(p, 1e-300)))
        num = ((((_C[0] * q + _C[1]) * q + _C[2]) * q + _C[3]) * q + _C[4]) * q + _C[5]
        den = (((_D[0] * q + _D[1]) * q + _D[2]) * q + _D[3]) * q + 1.0
        return -(num / den)
    r0 = p - 0.5
    r = r0 * r0
    num = ((((_A[0] * r + _A[1]) * r + _A[2]) * r + _A[3]) * r + _A[4]) * r + _A[5]
    den = ((((_B[0] * r + _B[1]) * r + _B[2]) * r + _B[3]) * r + _B[4]) * r + 1.0
    return -(num * r0 / den)


@njit(cache=True, parallel=True)
def group_limited_draw(
    head: np.ndarray,
    rest: np.ndarray,
    spacing: np.ndarray,
    within: np.ndarray,
    per: int,
    top_k: int,
    top2: bool,
) -> np.ndarray:
    """``[n, top_k]`` int16 experts, best first (tokens in parallel: each depends on its own
    random numbers only, so the result does not depend on the threads).

    Args:
        head: ``[n, groups, h]`` standard exponentials (float32): the gaps of every group's
            ``h`` best scores (``h = min(2, m)``), which its group score needs.
        rest: ``[n, topk_group, m - h]`` the gaps of the rest of the ``m`` best, for the kept
            groups in ascending group order.
        spacing: ``[m]`` ``1 / (per - i)``: depth ``i`` of a group is the running sum of its
            gaps times ``spacing`` (``-log`` of its ``i``-th best uniform score).
        within: ``[n, top_k]`` uniforms placing each pick inside its group.
        per: Experts per group.
        top_k: Experts per token.
        top2: Group score = its two best experts' half-normal scores summed (else its best).
    """
    n = head.shape[0]
    out = np.empty((n, top_k), np.int16)
    blocks = 64
    size = (n + blocks - 1) // blocks
    for b in prange(blocks):
        _draw_block(
            head, rest, spacing, within, per, top_k, top2, out, b * size, min(n, (b + 1) * size)
        )
    return out


@njit(cache=True)
def _draw_block(
    head: np.ndarray,
    rest: np.ndarray,
    spacing: np.ndarray,
    within: np.ndarray,
    per: int,
    top_k: int,
    top2: bool,
    out: np.ndarray,
    lo: int,
    hi: int,
) -> None:
    """Tokens ``lo`` to ``hi`` of :func:`group_limited_draw`."""
    groups, h = head.shape[1], head.shape[2]
    kept_n, more = rest.shape[1], rest.shape[2]
    m = h + more
    depth = np.empty((kept_n, m), np.float32)
    top = np.empty((groups, h), np.float32)
    score = np.empty(groups, np.float64)
    kept = np.zeros(groups, np.bool_)
    order = np.empty(kept_n, np.int64)
    nxt = np.empty(kept_n, np.int64)
    pos = np.empty((kept_n, m), np.int64)  # taken positions per kept group, ascending
    for t in range(lo, hi):
        for g in range(groups):
            acc = np.float32(0.0)
            for i in range(h):
                acc += head[t, g, i] * spacing[i]
                top[g, i] = acc
            if top2 and h >= 2:
                score[g] = _half_normal(top[g, 0]) + _half_normal(top[g, 1])
            else:
                score[g] = -top[g, 0]
            kept[g] = False
        for _ in range(kept_n):  # the best groups (ties: the lower index)
            best = -1
            for g in range(groups):
                if not kept[g] and (best < 0 or score[g] > score[best]):
                    best = g
            kept[best] = True
        j = 0
        for g in range(groups):  # kept groups in ascending order, their m depths
            if kept[g]:
                order[j] = g
                for i in range(h):
                    depth[j, i] = top[g, i]
                acc = top[g, h - 1]
                for i in range(more):
                    acc += rest[t, j, i] * spacing[h + i]
                    depth[j, h + i] = acc
                nxt[j] = 0
                j += 1
        for p in range(top_k):  # merge the kept groups' increasing depths
            best = -1
            for j in range(kept_n):
                if nxt[j] < m and (best < 0 or depth[j, nxt[j]] < depth[best, nxt[best]]):
                    best = j
            taken = nxt[best]  # picks from this group so far
            nxt[best] += 1
            # a uniform expert among the group's untaken ones: the e-th free index, past the
            # taken ones at or below it (kept ascending in pos[best, :taken])
            e = min(int(within[t, p] * (per - taken)), per - taken - 1)
            q = 0
            while q < taken and pos[best, q] <= e:
                e += 1
                q += 1
            for r in range(taken, q, -1):
                pos[best, r] = pos[best, r - 1]
            pos[best, q] = e
            out[t, p] = order[best] * per + e
