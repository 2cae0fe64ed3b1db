"""Compiled flows of a count matrix (numba; imported on first use, cached on disk)."""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True)
def pairs(
    counts: np.ndarray, src_gpu: np.ndarray, dst_gpu: np.ndarray, tb: float, own: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``src``, ``dst`` and bytes of the non-zero entries of ``counts`` in row-major order,
    without a GPU's entry to itself unless ``own`` (:func:`moesim.comm.alltoall._pairs`)."""
    rows, cols = counts.shape
    src = np.empty(rows * cols, np.int64)
    dst = np.empty(rows * cols, np.int64)
    nbytes = np.empty(rows * cols)
    n = 0
    for s in range(rows):
        for d in range(cols):
            if counts[s, d] != 0 and (own or src_gpu[s] != dst_gpu[d]):
                src[n], dst[n] = src_gpu[s], dst_gpu[d]
                nbytes[n] = counts[s, d] * tb
                n += 1
    return src[:n], dst[:n], nbytes[:n]
