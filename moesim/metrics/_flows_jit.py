"""Compiled byte counts of a phase's flows (numba; imported on first use, cached on disk)."""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True)
def flow_totals(
    src: np.ndarray, dst: np.ndarray, nbytes: np.ndarray, gpn: int, gpus: int
) -> tuple[np.ndarray, float, float]:
    """``[gpus]`` bytes each GPU sends, and the bytes between nodes and within nodes, of the
    flows that leave their GPU (:meth:`moesim.metrics.collector.Collector.on_flows`)."""
    sent = np.zeros(gpus)
    inter = 0.0
    within = 0.0
    for f in range(src.size):
        s, d = src[f], dst[f]
        if s == d:
            continue
        sent[s] += nbytes[f]
        if s // gpn != d // gpn:
            inter += nbytes[f]
        else:
            within += nbytes[f]
    return sent, inter, within
