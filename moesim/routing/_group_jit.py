"""Compiled group-limited top-k draws (numba; imported on first use, cached on disk).

**Exact** (:func:`exact_draw`): the order-statistics draw of
:func:`moesim.routing.sources.group_limited_topk`, one token at a time, with random numbers
made where they are used: every token has its own stream (SplitMix64 started from the draw's
seed and the token's index), so a token's experts depend on the seed and its index only,
whatever the threads. Exponential gaps come from a ziggurat (Marsaglia and Tsang 2000, 256
levels, what numpy's ``standard_exponential`` uses: exact, one random integer and a table
look-up almost always), a group's half-normal scores from a table of Acklam's quantile
(:data:`HALF_NORMAL`, interpolated), and a kept group's depths past its two best are drawn
only when the merge reaches them. Ties (of depths or group scores) go to the lower index.

**By patterns** (:func:`by_pattern`, the default: :mod:`moesim.routing.patterns`): groups
are exchangeable, and so are the experts of a group, so a token's draw factors into three
independent parts: which groups it keeps, ordered by group score (a uniform ordered draw of
``topk_group`` of the ``n_group`` groups); its *pattern*, the score rank (among the kept
groups) of the group of each of its picks, best pick first, whose law does not depend on the
groups' labels; and which experts of a group it takes (uniform, without replacement). Only
the pattern's law has no closed form: it is tabulated per configuration from exact draws
(:mod:`moesim.routing.patterns`; DeepSeek-V3's 8 groups, 4 kept, top-8: 9,513 patterns) and
drawn with an alias table. A token then costs 13 random numbers and no transcendental
function: a 256-GPU decode layer's 32,768 tokens take ~1 ms instead of ~10 ms exactly.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from moesim.routing._acklam import _A, _B, _C, _D, half_normal_from_depth
from moesim.routing._streams import BLOCKS, GAMMA, mix, start, uniform

_TWO53 = 2.0**53


def _ziggurat_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Marsaglia and Tsang's 256-level exponential ziggurat, for 53-bit integers: ``ke``
    (accept below), ``we`` (integer to abscissa) and ``fe`` (density at each level)."""
    de = te = 7.697117470131487
    ve = 3.949659822581572e-3
    ke, we, fe = np.zeros(256, np.int64), np.zeros(256), np.zeros(256)
    q = ve / math.exp(-de)
    ke[0] = int((de / q) * _TWO53)
    we[0], we[255] = q / _TWO53, de / _TWO53
    fe[0], fe[255] = 1.0, math.exp(-de)
    for i in range(254, 0, -1):
        de = -math.log(ve / de + math.exp(-de))
        ke[i + 1] = int((de / te) * _TWO53)
        te = de
        fe[i] = math.exp(-de)
        we[i] = de / _TWO53
    return ke, we, fe


_KE, _WE, _FE = _ziggurat_tables()  # globals: compiled in as constants
_R = 7.697117470131487  # the ziggurat's base-strip edge: past it, R + Exp(1)

_PER_OCTAVE = 1024
_LOW, _HIGH = -40, 6  # depths in [2^LOW, 2^HIGH) come from the table


def _half_normal_table() -> np.ndarray:
    """The half-normal score at depths ``d = (1/2 + j / 2M) 2^e`` for ``e`` in
    ``[LOW, HIGH)``, ``M`` points an octave (and the end point)."""
    e = np.arange(_LOW, _HIGH + 1)[:, None]
    j = np.arange(_PER_OCTAVE)[None, :]
    d = ((0.5 + j / (2 * _PER_OCTAVE)) * np.exp2(e.astype(np.float64))).ravel()
    return half_normal_from_depth(d)[: (_HIGH - _LOW) * _PER_OCTAVE + 1]


HALF_NORMAL = _half_normal_table()


@njit(cache=True)
def _exponential(s: np.uint64) -> tuple[np.uint64, float]:
    """The next state, and a standard exponential by the ziggurat."""
    while True:
        s = s + GAMMA
        z = mix(s)
        i = int(z & np.uint64(255))
        r = np.int64(z >> np.uint64(11))
        x = r * _WE[i]
        if r < _KE[i]:
            return s, x
        s, u = uniform(s)
        if i == 0:
            return s, _R - math.log1p(-u)
        if _FE[i] + (_FE[i - 1] - _FE[i]) * u < math.exp(-x):
            return s, x


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


@njit(cache=True)
def _half_normal_fast(depth: float) -> float:
    """:func:`_half_normal` by quadratic interpolation in :data:`HALF_NORMAL` (outside its
    range, computed)."""
    mant, e = math.frexp(depth)
    if e < _LOW or e >= _HIGH:
        return _half_normal(depth)
    x = (mant - 0.5) * (2 * _PER_OCTAVE)
    j = min(int(x), _PER_OCTAVE - 2)  # three points of one octave (equally spaced)
    i = (e - _LOW) * _PER_OCTAVE + j
    f = x - j
    a, b, c = HALF_NORMAL[i], HALF_NORMAL[i + 1], HALF_NORMAL[i + 2]
    return a + f * (b - a) + 0.5 * f * (f - 1.0) * (c - 2.0 * b + a)


@njit(cache=True)
def half_normal_table_error(depths: np.ndarray) -> np.ndarray:
    """``[n]`` the interpolated half-normal score minus Acklam's at each depth (tests)."""
    out = np.empty(depths.size)
    for i in range(depths.size):
        out[i] = _half_normal_fast(depths[i]) - _half_normal(depths[i])
    return out


@njit(cache=True)
def exponentials(seed: int, n: int) -> np.ndarray:
    """``[n]`` standard exponentials of one stream (tests)."""
    s = mix(np.uint64(seed))
    out = np.empty(n)
    for i in range(n):
        s, out[i] = _exponential(s)
    return out


def exact_draw(
    seed: int, n: int, groups: int, per: int, top_k: int, kept: int, top2: bool
) -> np.ndarray:
    """``[n, top_k]`` int16 experts, best first, of ``n`` tokens by the order statistics
    (see the module docstring).

    Args:
        seed: The draw's seed (its tokens' streams start from it).
        n: Tokens.
        groups: Expert groups.
        per: Experts per group.
        top_k: Experts per token.
        kept: Groups a token keeps (``topk_group``).
        top2: Group score = its two best experts' half-normal scores summed (else its best).
    """
    experts, _ = _exact(seed, n, groups, per, top_k, kept, top2, False)
    return experts


def pattern_codes(
    seed: int, n: int, groups: int, per: int, top_k: int, kept: int, top2: bool
) -> np.ndarray:
    """``[n]`` the patterns of ``n`` exact draws as numbers: the score rank (among the kept
    groups) of the group of pick ``p`` is the ``p``-th digit in base ``kept``. Arguments as
    :func:`exact_draw`."""
    _, codes = _exact(seed, n, groups, per, top_k, kept, top2, True)
    return codes


@njit(cache=True, parallel=True)
def by_pattern(
    seeds: np.ndarray,
    n: int,
    groups: int,
    per: int,
    kept: int,
    rows: np.ndarray,
    prob: np.ndarray,
    alias: np.ndarray,
) -> np.ndarray:
    """``[layers, n, top_k]`` int16 experts, best first, of ``n`` tokens in each of
    ``layers`` draws (``seeds``: one each) by patterns (``rows``, drawn with the alias table
    ``prob`` / ``alias``: :mod:`moesim.routing.patterns`); ``per`` <= 64 (a group's taken
    experts are the bits of one integer)."""
    top_k, n_rows = rows.shape[1], rows.shape[0]
    out = np.empty((seeds.size, n, top_k), np.int16)
    size = (n + BLOCKS - 1) // BLOCKS
    for lb in prange(seeds.size * BLOCKS):
        layer, b = lb // BLOCKS, lb % BLOCKS
        base = mix(np.uint64(seeds[layer]))
        perm = np.empty(groups, np.int64)
        taken = np.empty(kept, np.int64)  # a kept group's taken experts, as bits
        for t in range(b * size, min(n, (b + 1) * size)):
            s = start(base, t)
            s, u = uniform(s)
            u *= n_rows
            i = min(int(u), n_rows - 1)
            if u - i >= prob[i]:
                i = alias[i]
            for g in range(groups):
                perm[g] = g
            for r in range(kept):  # the kept groups by score rank: a uniform ordered draw
                s, u = uniform(s)
                j = min(r + int(u * (groups - r)), groups - 1)
                perm[r], perm[j] = perm[j], perm[r]
                taken[r] = 0
            for p in range(top_k):
                r = rows[i, p]
                while True:  # a uniform expert of the group, again while taken
                    s, u = uniform(s)
                    e = min(int(u * per), per - 1)
                    bit = np.int64(1) << np.int64(e)
                    if not taken[r] & bit:
                        taken[r] |= bit
                        break
                out[layer, t, p] = perm[r] * per + e
    return out


@njit(cache=True, parallel=True)
def _exact(
    seed: int,
    n: int,
    groups: int,
    per: int,
    top_k: int,
    kept_n: int,
    top2: bool,
    with_codes: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`exact_draw`, and with ``with_codes`` each token's pattern as a number: the
    score rank (among the kept groups) of the group of pick ``p`` is its ``p``-th digit in
    base ``kept_n``."""
    out = np.empty((n, top_k), np.int16)
    codes = np.zeros(n if with_codes else 0, np.int64)
    size = (n + BLOCKS - 1) // BLOCKS
    base = mix(np.uint64(seed))
    m = min(top_k, per)  # only a group's best top_k can be picked
    h = min(2, m)  # order statistics every group needs for its score
    for b in prange(BLOCKS):
        gap = np.empty(m)  # depth i - depth i-1 = E / (per - i)
        for i in range(m):
            gap[i] = 1.0 / (per - i)
        top = np.empty((groups, h))
        score = np.empty(groups)
        order = np.empty(kept_n, np.int64)
        krank = np.empty(kept_n, np.int64)  # each kept group's rank by score
        depth = np.empty((kept_n, m))  # the kept groups' depths drawn so far
        nxt = np.empty(kept_n, np.int64)
        head = np.empty(kept_n)  # each kept group's next depth (inf past its m-th)
        pos = np.empty((kept_n, m), np.int64)  # taken positions per kept group, ascending
        for t in range(b * size, min(n, (b + 1) * size)):
            s = start(base, t)
            for g in range(groups):
                acc = 0.0
                for i in range(h):  # depth i: -log of the group's i-th best uniform score
                    s, x = _exponential(s)
                    acc += x * gap[i]
                    top[g, i] = acc
                if top2 and h >= 2:
                    score[g] = _half_normal_fast(top[g, 0]) + _half_normal_fast(top[g, 1])
                else:
                    score[g] = -top[g, 0]
            j = 0
            for g in range(groups):  # the best groups (ties: the lower index), ascending
                rank = 0
                for o in range(groups):
                    rank += (score[o] > score[g]) | ((score[o] == score[g]) & (o < g))
                if rank < kept_n:
                    order[j], krank[j], nxt[j] = g, rank, 0
                    for i in range(h):
                        depth[j, i] = top[g, i]
                    head[j] = top[g, 0]
                    j += 1
            for p in range(top_k):  # merge the kept groups' increasing depths
                best = 0
                for j in range(1, kept_n):
                    if head[j] < head[best]:
                        best = j
                taken = nxt[best]  # picks from this group so far
                nxt[best] = taken + 1
                if taken + 1 >= m:
                    head[best] = np.inf
                else:
                    if taken + 1 >= h:  # a depth past the two best: drawn now
                        s, x = _exponential(s)
                        depth[best, taken + 1] = depth[best, taken] + x * gap[taken + 1]
                    head[best] = depth[best, taken + 1]
                # a uniform expert among the group's untaken ones: the e-th free index, past
                # the taken ones at or below it (kept ascending in pos[best, :taken])
                s, u = uniform(s)
                e = min(int(u * (per - taken)), per - taken - 1)
                q = 0
                while q < taken and pos[best, q] <= e:
                    e += 1
                    q += 1
                for r in range(taken, q, -1):
                    pos[best, r] = pos[best, r - 1]
                pos[best, q] = e
                out[t, p] = order[best] * per + e
                if with_codes:
                    codes[t] += krank[best] * kept_n**p
    return out, codes
