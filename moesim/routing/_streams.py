"""Random streams for the compiled routing draws (numba): SplitMix64, one stream per token.

A draw's tokens each get their own stream, started from the draw's seed and the token's
index, so what a token draws depends on those two only, whatever the threads.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_INV53 = 1.0 / 2.0**53
BLOCKS = 64  # tokens are split into this many blocks for the threads


@njit(cache=True)
def mix(z: np.uint64) -> np.uint64:
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


@njit(cache=True)
def start(base: np.uint64, token: int) -> np.uint64:
    """The stream of token ``token`` of a draw whose streams start from ``base``."""
    return mix(base ^ (np.uint64(token) * GAMMA))


# The stream's state is passed in and handed back: a compiled call with an array argument
# costs as much as the arithmetic here.
@njit(cache=True)
def uniform(s: np.uint64) -> tuple[np.uint64, float]:
    """SplitMix64's next state, and a uniform on ``[0, 1)`` of 53 of its random bits."""
    s = s + GAMMA
    return s, np.int64(mix(s) >> np.uint64(11)) * _INV53


@njit(cache=True, parallel=True)
def uniform_distinct(seed: int, n: int, k: int, experts: int) -> np.ndarray:
    """``[n, k]`` int16: ``k`` distinct experts per token, uniform (a repeat is drawn again:
    i.i.d. uniform draws conditioned on distinctness, what
    :func:`moesim.routing.sources.distinct_topk` draws for a uniform popularity)."""
    out = np.empty((n, k), np.int16)
    size = (n + BLOCKS - 1) // BLOCKS
    base = mix(np.uint64(seed))
    for b in prange(BLOCKS):
        for t in range(b * size, min(n, (b + 1) * size)):
            s = start(base, t)
            for j in range(k):
                while True:
                    s, u = uniform(s)
                    e = min(int(u * experts), experts - 1)
                    repeat = False
                    for i in range(j):
                        repeat |= out[t, i] == e
                    if not repeat:
                        break
                out[t, j] = e
    return out
