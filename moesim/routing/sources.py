"""Routing sources: where each step's token-to-expert assignments come from.

A source is built by a factory registered under the name a scenario's ``routing.source`` uses,
and draws, for every MoE layer, ``top_k`` distinct experts per token::

    experts: [moe_layers, ranks, tokens, top_k] int64
    weights: [moe_layers, ranks, tokens, top_k] float64 (gate weights, rows sum to 1)
    fallback: [moe_layers, ranks, tokens, m] int64 (next choices, for rerouting; optional)

``synthetic`` draws from a per-layer expert popularity: ``uniform`` (all equal), ``zipf``
(popularity of the expert of rank ``i`` proportional to ``1 / i**skew``, ranks shuffled per layer
so that each layer has different hot experts) or ``dirichlet`` (popularity drawn per layer from a
symmetric Dirichlet of concentration ``alpha``); ``fitted`` is fitted to a trace or to published
counts (:mod:`moesim.routing.replay`). ``trace`` replays a trace. ``group_limited`` reproduces
DeepEP's benchmark routing for models with expert groups (DeepSeek-V3: 8 groups, a token
reaches at most 4): see :func:`group_limited_topk`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from moesim.config.scenario import Routing
from moesim.models.spec import ModelSpec
from moesim.registry import Registry
from moesim.routing._acklam import half_normal_from_depth
from moesim.routing.batch import TokenBatch


@dataclass(frozen=True)
class RoutingDraw:
    """One step's assignments for every MoE layer (shapes in the module docstring)."""

    experts: np.ndarray
    weights: np.ndarray | None
    fallback: np.ndarray | None = None


class RoutingSource(Protocol):
    """What the routing stage needs from a source of routing.

    Attributes:
        records_scores: Its draws come with the router scores that made them (a trace's
            recorded logits), so a dropped assignment can follow the router's next choices.
    """

    records_scores: bool

    def expected_loads(self) -> np.ndarray:
        """``[moe_layers, experts]`` expected share of assignments per expert (for placement)."""
        ...

    def draw(
        self,
        step: int,
        layers: np.ndarray,
        batch: TokenBatch,
        rng: np.random.Generator,
        with_weights: bool,
    ) -> RoutingDraw:
        """Assignments of the tokens of ``batch`` at ``step`` for MoE layers ``layers``.

        Args:
            step: Step index.
            layers: ``[n]`` int, indices into the model's MoE layers.
            batch: The step's tokens.
            rng: The only source of randomness.
            with_weights: Whether gate weights are needed (else ``weights`` may be None).
        """
        ...

    def scores(
        self, step: int, layers: np.ndarray, batch: TokenBatch, rng: np.random.Generator
    ) -> np.ndarray:
        """``[L, ranks, tokens, E]`` router scores of ``batch``'s tokens (re-gating reads them).

        Raises:
            MoesimError: the source has none (e.g. a trace captured without logits).
        """
        ...


SourceFactory = Callable[[Routing, ModelSpec, np.random.Generator], RoutingSource]
SOURCES: Registry[SourceFactory] = Registry("routing source")


def zipf_popularity(layers: int, experts: int, skew: float, rng: np.random.Generator) -> np.ndarray:
    """``[layers, experts]`` popularity, each row a shuffled Zipf(skew) distribution."""
    base = 1.0 / np.arange(1, experts + 1) ** skew
    base /= base.sum()
    return np.stack([base[rng.permutation(experts)] for _ in range(layers)])


def _sampler(p: np.ndarray, rng: np.random.Generator) -> Callable[[np.ndarray], np.ndarray]:
    """A function drawing one expert id per entry of a layer-index array, from ``p``."""
    layers, experts = p.shape
    if np.all(p == p[:, :1]):  # uniform in every layer
        return lambda layer_idx: rng.integers(0, experts, size=layer_idx.shape, dtype=np.int16)
    cdf = np.cumsum(p, axis=1)
    cdf[:, -1] = 1.0
    flat = (cdf + np.arange(layers, dtype=np.float64)[:, None]).ravel()

    def draw(layer_idx: np.ndarray) -> np.ndarray:
        ids = np.searchsorted(flat, rng.random(layer_idx.shape) + layer_idx, side="right")
        return np.minimum(ids - layer_idx * experts, experts - 1).astype(np.int16)

    return draw


def first_of_kind(x: np.ndarray) -> np.ndarray:
    """``[..., k]`` bool: True where a slot's value does not occur in an earlier slot.

    Works slot-major (one contiguous comparison per pair of slots), which is far faster in
    numpy than reducing over a short last axis.
    """
    k = x.shape[-1]
    cols = np.ascontiguousarray(np.moveaxis(x, -1, 0))
    first = np.ones(cols.shape, dtype=bool)
    for j in range(1, k):
        seen = cols[j] == cols[0]
        for i in range(1, j):
            seen |= cols[j] == cols[i]
        first[j] = ~seen
    return np.moveaxis(first, 0, -1)


def _duplicate_slots(x: np.ndarray) -> np.ndarray:
    """``[n, k]`` bool: slot j repeats one of the slots before it in its row."""
    return ~first_of_kind(x)


UNIFORM_COMPILED_MIN = 1 << 22
"""Assignments from which a uniform :func:`distinct_topk` is drawn compiled
(:func:`moesim.routing._streams.uniform_distinct`: the same distribution, random numbers of
its own seeded from the generator; a 64-GPU prefill chunk's 4M in ~15 ms instead of ~60)."""


def distinct_topk(p: np.ndarray, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Draw ``k`` distinct experts for each of ``n`` tokens in every layer.

    Each slot is drawn from the layer's popularity ``p``; slots that repeat an earlier slot of
    the same token are drawn again until all are distinct (i.i.d. draws conditioned on
    distinctness). Uniform draws of :data:`UNIFORM_COMPILED_MIN` assignments or more run
    compiled.

    Args:
        p: ``[layers, experts]`` popularity, rows sum to 1.
        n: Tokens.
        k: Experts per token (< experts).

    Returns:
        ``[layers, n, k]`` int16 expert ids.
    """
    layers = p.shape[0]
    if layers * n * k >= UNIFORM_COMPILED_MIN and np.all(p == p[:, :1]):
        from moesim.routing._streams import uniform_distinct

        seed = int(rng.integers(0, 2**63))  # the draw's streams start from the seed's
        return uniform_distinct(seed, layers * n, k, p.shape[1]).reshape(layers, n, k)
    draw = _sampler(p, rng)
    layer_of = np.repeat(np.arange(layers), n)  # [layers * n], one per row
    x = draw(np.broadcast_to(layer_of[:, None], (layers * n, k)))
    x = _redraw_repeats(
        x,
        lambda rows, dup: draw(np.broadcast_to(layer_of[rows][:, None], dup.shape)[dup]),
        "could not draw distinct experts; the popularity is too skewed",
    )
    return x.reshape(layers, n, k)


def _redraw_repeats(
    x: np.ndarray,
    redraw: Callable[[np.ndarray, np.ndarray], np.ndarray],
    failure: str,
    rounds: int = 10_000,
) -> np.ndarray:
    """``[n, k]`` ``x`` with every slot that repeats an earlier slot of its row drawn again
    until each row is distinct (i.i.d. draws conditioned on distinctness).

    Args:
        redraw: ``(rows, dup)`` -> new values for ``x[rows][dup]``, where ``rows`` are the
            row indices still holding repeats and ``dup`` marks the repeating slots.
        failure: The error raised when ``rounds`` are not enough.
    """
    rows = np.nonzero(_duplicate_slots(x).any(axis=1))[0]
    for _ in range(rounds):
        if not rows.size:
            return x
        sub = x[rows]
        dup = _duplicate_slots(sub)
        sub[dup] = redraw(rows, dup)
        x[rows] = sub
        rows = rows[_duplicate_slots(sub).any(axis=1)]
    raise RuntimeError(failure)


GROUP_COMPILED_MIN_TOKENS = 1 << 13
"""Tokens per draw from which :func:`group_limited_topk` runs compiled: a 256-GPU decode
step's 32,768 tokens a layer take about 1 ms by patterns instead of 56 ms on numpy; smaller
draws stay on numpy, whose kernel-free start is cheaper."""


def group_limited_topk(
    n: int,
    experts: int,
    top_k: int,
    n_group: int,
    topk_group: int,
    rng: np.random.Generator,
    group_score: str = "top2_sum",
    chunk: int = 65536,
) -> np.ndarray:
    """Group-limited top-k routing on DeepEP's benchmark scores, drawn from order statistics.

    Scores are ``|N(0, 1)| + 1`` per (token, expert), as in DeepEP's tests. A group's score is
    the sum of its two best experts (``top2_sum``, DeepSeek-V3's ``noaux_tc`` router) or its
    best expert (``max``, DeepEP's ``tests/test_internode.py``, where a group is a node's
    experts); each token keeps its ``topk_group`` best groups and its ``top_k`` best experts
    inside them.

    The scores are i.i.d., so only each group's best ``top_k`` matter, and which of the group's
    experts hold them is a uniform draw without replacement. Those order statistics are drawn
    directly (the ``i``-th best of ``m`` uniforms is ``exp(-(E_1/m + ... + E_i/(m-i+1)))`` for
    i.i.d. exponentials ``E``; rank comparisons need nothing more, a ``top2_sum`` the two best
    half-normal values through the normal quantile): a quarter of the random numbers and none
    of the sorting over every expert that scoring all of them needs, with the same
    distribution (:func:`group_limited_topk_scored` is that reference; tests compare the two).

    From :data:`GROUP_COMPILED_MIN_TOKENS` tokens on, a compiled kernel draws the same
    order statistics with random numbers of its own, seeded from ``rng``, factored by
    exchangeability into kept groups, a tabulated pattern and experts inside the groups
    (:mod:`moesim.routing.patterns`, :mod:`moesim.routing._group_jit`): the same
    distribution, so the two give different samples for one seed.

    Returns:
        ``[n, top_k]`` int16 expert ids, best first.
    """
    if n >= GROUP_COMPILED_MIN_TOKENS:
        return group_limited_layers(1, n, experts, top_k, n_group, topk_group, rng, group_score)[0]
    per = experts // n_group
    m = min(top_k, per)
    head = min(2, m)  # order statistics every group needs for its score
    out = np.empty((n, top_k), dtype=np.int16)
    spacing = (1.0 / (per - np.arange(m))).astype(np.float32)  # gaps: E_i / (per - i)
    for start in range(0, n, chunk):
        c = min(chunk, n - start)
        # depth[t, g, i]: -log of the i-th best of group g's `per` uniforms (increasing in i);
        # the best `head` for every group, the rest only for the groups kept.
        depth = np.cumsum(
            rng.standard_exponential((c, n_group, head), dtype=np.float32) * spacing[:head],
            axis=2,
        )
        if group_score == "max" or per < 2:
            gscore = -depth[:, :, 0]
        else:
            gscore = half_normal_from_depth(depth[:, :, 0]) + half_normal_from_depth(depth[:, :, 1])
        if topk_group < n_group:
            keep = np.argpartition(-gscore, topk_group - 1, axis=1)[:, :topk_group]
            depth = np.take_along_axis(depth, keep[:, :, None], axis=1)
        else:
            keep = np.broadcast_to(np.arange(n_group), (c, n_group))
        if m > head:
            rest = rng.standard_exponential((c, keep.shape[1], m - head), dtype=np.float32)
            rest = depth[:, :, -1:] + np.cumsum(rest * spacing[head:], axis=2)
            depth = np.concatenate([depth, rest], axis=2)
        cand = depth.reshape(c, -1)
        pick = np.argpartition(cand, top_k - 1, axis=1)[:, :top_k]
        pick = np.take_along_axis(
            pick, np.argsort(np.take_along_axis(cand, pick, axis=1), axis=1), axis=1
        )
        group = np.take_along_axis(keep, pick // m, axis=1)
        out[start : start + c] = _experts_within(group.astype(np.int64) * per, per, rng)
    return out


def group_limited_layers(
    layers: int,
    n: int,
    experts: int,
    top_k: int,
    n_group: int,
    topk_group: int,
    rng: np.random.Generator,
    group_score: str = "top2_sum",
) -> np.ndarray:
    """``[layers, n, top_k]``: :func:`group_limited_topk` for each of ``layers`` layers, the
    draws of :data:`GROUP_COMPILED_MIN_TOKENS` tokens or more in one compiled call (a seed
    each from ``rng``, as one call a layer would take)."""
    if n < GROUP_COMPILED_MIN_TOKENS:
        return np.stack(
            [
                group_limited_topk(n, experts, top_k, n_group, topk_group, rng, group_score)
                for _ in range(layers)
            ]
        )
    from moesim.routing.patterns import group_limited_draw

    seeds = np.array([rng.integers(0, 2**63) for _ in range(layers)], dtype=np.int64)
    per = experts // n_group
    top2 = group_score != "max" and per >= 2
    return group_limited_draw(seeds, n, n_group, per, top_k, topk_group, top2)


def _experts_within(first: np.ndarray, per: int, rng: np.random.Generator) -> np.ndarray:
    """``[n, k]`` experts holding the picked order statistics, slot ``j`` in the group whose
    first expert is ``first[:, j]``: uniform inside it, distinct within the row (repeats are
    drawn again, which is sampling without replacement)."""
    return _redraw_repeats(
        first + rng.integers(0, per, size=first.shape),
        lambda rows, dup: first[rows][dup] + rng.integers(0, per, size=int(dup.sum())),
        "could not draw distinct experts inside the groups",
    )


def group_limited_topk_scored(
    n: int,
    experts: int,
    top_k: int,
    n_group: int,
    topk_group: int,
    rng: np.random.Generator,
    group_score: str = "top2_sum",
    chunk: int = 16384,
) -> np.ndarray:
    """:func:`group_limited_topk` by scoring every expert of every token, as DeepEP's tests do
    (the reference the order-statistics draw is tested against)."""
    from moesim.policies.gating import group_limited_select

    out = np.empty((n, top_k), dtype=np.int16)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        scores = np.abs(rng.standard_normal((m, experts), dtype=np.float32)) + 1.0
        out[start : start + m] = group_limited_select(
            scores, n_group, topk_group, top_k, group_score
        )
    return out


def next_choices(
    experts: np.ndarray,
    popularity: np.ndarray,
    depth: int,
    rng: np.random.Generator,
    chunk: int = 1 << 16,
) -> np.ndarray:
    """Each token's next ``depth`` choices after its top-k, in preference order.

    The continuation of sampling without replacement from the layer's popularity (Gumbel-top-k
    over the experts the token has not chosen): what a token-choice router's next scores are
    under the generators' model.

    Args:
        experts: ``[L, R, T, k]`` chosen experts.
        popularity: ``[L, E]`` per-layer popularity.
        depth: Next choices wanted (at most ``E - k``).

    Returns:
        ``[L, R, T, depth]`` int64.
    """
    from moesim.policies.gating import top_indices

    n_layers, ranks, tokens, k = experts.shape
    e = popularity.shape[1]
    depth = min(depth, e - k)
    logp = np.log(np.maximum(popularity, 1e-300))
    flat = experts.reshape(n_layers, -1, k).astype(np.int64)
    out = np.empty((n_layers, flat.shape[1], depth), dtype=np.int64)
    for li in range(n_layers):
        for start in range(0, flat.shape[1], chunk):
            rows = flat[li, start : start + chunk]
            g = logp[li] - np.log(-np.log(rng.random((rows.shape[0], e))))
            np.put_along_axis(g, rows, -np.inf, axis=1)
            out[li, start : start + chunk] = top_indices(g, depth)
    return out.reshape(n_layers, ranks, tokens, depth)


def next_choices_by_score(experts: np.ndarray, scores: np.ndarray, depth: int) -> np.ndarray:
    """Each token's next ``depth`` choices after its top-k: its highest router scores among the
    experts it has not chosen (a recorded trace's logits, or the scores a gate routed by).

    Args:
        experts: ``[L, R, T, k]`` chosen experts (``-1`` where a gate left a slot empty).
        scores: ``[L, R, T, E]`` router scores of the same tokens.
        depth: Next choices wanted (at most ``E - k``).

    Returns:
        ``[L, R, T, depth]`` int64, best first.
    """
    from moesim.policies.gating import top_indices

    n_layers, ranks, tokens, k = experts.shape
    e = scores.shape[-1]
    depth = min(depth, e - k)
    chosen = np.where(experts >= 0, experts, experts[..., :1]).reshape(-1, k).astype(np.int64)
    s = np.array(scores, dtype=np.float32).reshape(-1, e)
    np.put_along_axis(s, chosen, -np.inf, axis=1)
    return top_indices(s, depth).reshape(n_layers, ranks, tokens, depth)


class SyntheticSource:
    """Uniform or Zipf-skewed top-k routing with fixed per-layer popularity."""

    records_scores = False  # its scores are drawn afresh, not those that made its draws

    def __init__(self, cfg: Routing, model: ModelSpec, rng: np.random.Generator) -> None:
        layers, experts = len(model.moe_layers), model.moe.num_experts
        if cfg.generator == "dirichlet":
            self.popularity = rng.dirichlet(np.full(experts, cfg.alpha), size=layers)
        else:
            skew = cfg.skew if cfg.generator == "zipf" else 0.0
            self.popularity = zipf_popularity(layers, experts, skew, rng)
        self.top_k = model.moe.top_k
        self.model, self.generator = model, cfg.generator

    def expected_loads(self) -> np.ndarray:
        """``[moe_layers, experts]`` popularity."""
        return self.popularity

    def scores(
        self, step: int, layers: np.ndarray, batch: TokenBatch, rng: np.random.Generator
    ) -> np.ndarray:
        """``[L, ranks, tokens, E]`` router scores consistent with the generator.

        ``log popularity + Gumbel noise``: the top-k of these scores is a draw of k distinct
        experts without replacement from the popularity (Plackett-Luce), what ``draw`` samples;
        ``group_limited`` uses DeepEP's benchmark scores ``|N(0, 1)| + 1``.
        """
        e = self.popularity.shape[1]
        shape = (len(layers), batch.ranks, batch.tokens_per_rank, e)
        if self.generator == "group_limited":
            return np.abs(rng.standard_normal(shape, dtype=np.float32)) + 1.0
        logp = np.log(np.maximum(self.popularity[layers], 1e-30)).astype(np.float32)
        gumbel = -np.log(-np.log(rng.random(shape, dtype=np.float32) + 1e-12) + 1e-12)
        return logp[:, None, None, :] + gumbel

    def draw(
        self,
        step: int,
        layers: np.ndarray,
        batch: TokenBatch,
        rng: np.random.Generator,
        with_weights: bool,
    ) -> RoutingDraw:
        """Draw assignments for ``batch``; gate weights are the renormalised popularities."""
        pop = self.popularity[layers]
        n = batch.ranks * batch.tokens_per_rank
        if self.generator == "group_limited":
            moe = self.model.moe
            experts = group_limited_layers(
                len(layers), n, moe.num_experts, moe.top_k, moe.n_group, moe.topk_group, rng
            )
        else:
            experts = distinct_topk(pop, n, self.top_k, rng)
        shape = (len(layers), batch.ranks, batch.tokens_per_rank, self.top_k)
        if not with_weights:
            return RoutingDraw(experts=experts.reshape(shape), weights=None)
        w = np.take_along_axis(pop[:, None, :], experts.astype(np.intp), axis=2)
        w = w / w.sum(axis=-1, keepdims=True)
        return RoutingDraw(experts=experts.reshape(shape), weights=w.reshape(shape))
