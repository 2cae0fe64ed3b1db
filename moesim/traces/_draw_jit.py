"""Compiled draw of the fitted generator's choices (numba; imported on first use, cached on
disk).

numpy builds an ``[n, E]`` weight row, its cumulative sum and a comparison for every slot;
one compiled pass walks each token's ``E`` weights per slot with nothing in memory but the
token's taken mask. The arithmetic is :func:`moesim.traces.fit.draw_layer_numpy`'s, in the
same order (products, then a left-to-right running sum in float64), so the picks are the same,
exactly.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True)
def draw_layer(
    w: np.ndarray, tt: np.ndarray, prev: np.ndarray, conditioned: bool, u: np.ndarray
) -> np.ndarray:
    """``[n, k]`` distinct experts: slot ``s`` of token ``i`` is the first expert whose running
    sum of weights exceeds ``u[s, i]`` times the total (see ``draw_layer_numpy``)."""
    k, n = u.shape
    e = w.size
    out = np.empty((n, k), np.int16)
    taken = np.zeros(e, np.bool_)
    cum = np.empty(e, np.float64)
    for i in range(n):
        taken[:] = False
        for s in range(k):
            total = 0.0
            for j in range(e):
                if taken[j]:
                    x = 0.0
                elif conditioned:
                    x = w[j] * tt[prev[i, s], j]
                else:
                    x = w[j]
                total += x
                cum[j] = total
            x = u[s, i] * total
            below = np.nextafter(total, 0.0)
            if x > below:
                x = below
            pick = 0
            while cum[pick] <= x:
                pick += 1
            out[i, s] = pick
            taken[pick] = True
    return out
