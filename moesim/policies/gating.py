"""Gating: re-routing tokens from router scores.

A gate is a pure function over one MoE layer's scores of one data-parallel replica (all EP
ranks' tokens, in batch order)::

    gate(scores [n, E] float, ctx: GateContext) -> experts [n, m] int64 (-1 = no expert)

Registered gates (``policies.gating.type``):

- ``source``: no re-gating, the routing source's own choices (default);
- ``top_k``: each token's k highest scores (token choice, Shazeer et al. 2017);
- ``top_1``: the highest score only (Switch Transformer);
- ``group_limited``: DeepSeek-V3: a group's score is the sum of its two best experts, each token
  keeps its ``topk_group`` best of ``n_group`` groups and its k best experts inside them;
- ``expert_choice``: each expert takes its ``c = ceil(n * k * factor / E)`` highest-probability
  tokens (Zhou et al. 2022); a token gets 0 to E experts, no token is dropped by capacity;
- ``base``: BASE layers (Lewis et al. 2021): each token gets one expert, every expert exactly
  ``n / E`` tokens (rounded), maximising the total score: a linear assignment solved by an
  auction algorithm (Bertsekas; what BASE itself uses) to within ``n * eps`` of the optimum;
- ``s_base``: Sinkhorn-BASE (Clark et al. 2022): the softmax is balanced by Sinkhorn iterations
  (rows sum to 1, columns to n/E) and each token takes its k best balanced scores;
- ``sentence``: each sequence is routed as a whole by its tokens' mean score (top-k).

The auxiliary load-balancing loss of a gating (Switch Transformer, Fedus et al. 2022, eq. 4)
is ``E * sum_i f_i * P_i``: ``f_i`` the fraction of assignments to expert ``i``, ``P_i`` its mean
router probability; 1.0 is perfectly balanced.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from moesim.registry import Registry


@dataclass(frozen=True)
class GateContext:
    """What gates may use besides the scores.

    Attributes:
        top_k: Experts per token of the model.
        n_group / topk_group: Expert groups and groups per token (group_limited).
        factor: Capacity factor (expert_choice).
        seq_id: ``[n]`` sequence of each token (sentence).
    """

    top_k: int
    n_group: int = 1
    topk_group: int = 1
    factor: float = 1.0
    seq_id: np.ndarray | None = None


GateFn = Callable[[np.ndarray, GateContext], np.ndarray]


@dataclass(frozen=True)
class Gate:
    """A gating policy with its traits: adding one is one of these in :data:`GATINGS`.

    Attributes:
        select: ``(scores [n, E], ctx) -> experts [n, k]``, or None: keep the routing as the
            source drew or recorded it (``source``), which needs no router scores.
        balances: Balanced by construction (every expert gets its share), so capacity drops
            nothing (expert choice, BASE).
    """

    select: GateFn | None
    balances: bool = False

    @property
    def needs_scores(self) -> bool:
        """It re-gates from router scores (the source must give them)."""
        return self.select is not None


GATINGS: Registry[Gate] = Registry("gating")
GATINGS.register("source")(Gate(None))


def gate(name: str, balances: bool = False) -> Callable[[GateFn], GateFn]:
    """Decorator: register a gate function as the gating policy ``name`` with its traits."""

    def deco(fn: GateFn) -> GateFn:
        GATINGS.register(name)(Gate(fn, balances))
        return fn

    return deco


def softmax(scores: np.ndarray) -> np.ndarray:
    """Row softmax in float64."""
    x = scores.astype(np.float64)
    x = np.exp(x - x.max(axis=-1, keepdims=True))
    return x / x.sum(axis=-1, keepdims=True)


def top_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """``[n, k]`` indices of the k highest scores per row, best first."""
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1).astype(np.int64)


@gate("top_k")
def top_k(scores: np.ndarray, ctx: GateContext) -> np.ndarray:
    """Token choice: the k highest scores."""
    return top_indices(scores, ctx.top_k)


@gate("top_1")
def top_1(scores: np.ndarray, ctx: GateContext) -> np.ndarray:
    """Switch: the highest score."""
    return np.argmax(scores, axis=1).astype(np.int64)[:, None]


def group_limited_select(
    scores: np.ndarray, n_group: int, topk_group: int, k: int, group_score: str = "top2_sum"
) -> np.ndarray:
    """Top-k inside each token's best ``topk_group`` groups (DeepSeek-V3 ``noaux_tc``).

    A group's score is the sum of its two best experts (``top2_sum``) or its best (``max``).
    """
    n, e = scores.shape
    per_group = e // n_group
    grouped = scores.reshape(n, n_group, per_group)
    if group_score == "max" or per_group < 2:
        gscore = grouped.max(axis=2)
    else:
        gscore = np.partition(grouped, per_group - 2, axis=2)[:, :, -2:].sum(axis=2)
    if topk_group < n_group:
        keep = np.argpartition(-gscore, topk_group - 1, axis=1)[:, :topk_group]
        mask = np.zeros((n, n_group), dtype=bool)
        np.put_along_axis(mask, keep, True, axis=1)
        scores = np.where(np.repeat(mask, per_group, axis=1), scores, -np.inf)
    return top_indices(scores, k)


@gate("group_limited")
def group_limited(scores: np.ndarray, ctx: GateContext) -> np.ndarray:
    """DeepSeek-V3 group-limited top-k."""
    return group_limited_select(scores, ctx.n_group, ctx.topk_group, ctx.top_k)


@gate("expert_choice", balances=True)
def expert_choice(scores: np.ndarray, ctx: GateContext) -> np.ndarray:
    """Each expert takes its ``c`` highest-probability tokens; -1 pads tokens' rows."""
    n, e = scores.shape
    probs = softmax(scores)
    c = min(n, math.ceil(n * ctx.top_k * ctx.factor / e))
    chosen = np.argpartition(-probs, c - 1, axis=0)[:c]  # [c, E] token ids per expert
    taken = np.zeros((n, e), dtype=bool)
    taken[chosen, np.arange(e)[None, :]] = True
    m = max(int(taken.sum(axis=1).max()), 1)
    order = np.argsort(~taken, axis=1, kind="stable")[:, :m]  # taken experts first
    return np.where(np.take_along_axis(taken, order, axis=1), order, -1).astype(np.int64)


def balanced_assignment(
    scores: np.ndarray, capacity: np.ndarray, eps: float | None = None, max_rounds: int = 100_000
) -> np.ndarray:
    """Each row to one column, column ``j`` taking ``capacity[j]`` rows, maximising the sum.

    Forward auction (Bertsekas 1988) with column prices: every unassigned row bids for its
    best column at ``value - second best value + eps`` above the price; a full column keeps its
    ``capacity`` highest bids and its price rises to the lowest one kept. Ends within
    ``n * eps`` of the optimum.

    Args:
        scores: ``[n, E]``.
        capacity: ``[E]`` int, summing to ``n``.
        eps: Bid increment (default: score range / (10 n)).

    Returns:
        ``[n]`` int64 column of each row.
    """
    n, e = scores.shape
    if int(capacity.sum()) != n:
        raise ValueError("balanced assignment: capacities must sum to the rows")
    s = scores.astype(np.float64)
    if eps is None:
        eps = max(float(s.max() - s.min()), 1e-9) / (10.0 * n)
    price = np.zeros(e)
    owner = np.full(n, -1, dtype=np.int64)
    bid_of = np.zeros(n)
    for _ in range(max_rounds):
        free = np.nonzero(owner < 0)[0]
        if not free.size:
            return owner
        value = s[free] - price
        best = np.argmax(value, axis=1)
        v1 = value[np.arange(free.size), best]
        value[np.arange(free.size), best] = -np.inf
        v2 = value.max(axis=1) if e > 1 else v1
        bids = price[best] + (v1 - v2) + eps
        owner[free], bid_of[free] = best, bids
        for j in np.unique(best):
            holders = np.nonzero(owner == j)[0]
            if holders.size > capacity[j]:
                keep = holders[np.argsort(-bid_of[holders], kind="stable")[: capacity[j]]]
                owner[np.setdiff1d(holders, keep)] = -1
                price[j] = bid_of[keep].min()
            elif holders.size == capacity[j] and holders.size:
                price[j] = bid_of[holders].min()
    raise RuntimeError("balanced assignment did not converge")


@gate("base", balances=True)
def base(scores: np.ndarray, ctx: GateContext) -> np.ndarray:
    """BASE layers: one expert per token, equal tokens per expert, maximum total score."""
    n, e = scores.shape
    capacity = np.full(e, n // e)
    capacity[: n % e] += 1
    return balanced_assignment(scores, capacity)[:, None]


def sinkhorn(scores: np.ndarray, iters: int = 50) -> np.ndarray:
    """Balance ``exp(scores)`` so rows sum to 1 and columns to ``n / E`` (log-domain)."""
    n, e = scores.shape
    log_k = scores.astype(np.float64)
    u, v = np.zeros(n), np.zeros(e)
    log_col = math.log(n / e)
    for _ in range(iters):
        u = -np.logaddexp.reduce(log_k + v[None, :], axis=1)
        v = log_col - np.logaddexp.reduce(log_k + u[:, None], axis=0)
    return np.exp(log_k + u[:, None] + v[None, :])


@gate("s_base")
def s_base(scores: np.ndarray, ctx: GateContext) -> np.ndarray:
    """Sinkhorn-BASE: top-k of the Sinkhorn-balanced scores."""
    return top_indices(sinkhorn(scores), ctx.top_k)


@gate("sentence")
def sentence(scores: np.ndarray, ctx: GateContext) -> np.ndarray:
    """Route each sequence by its tokens' mean score; all its tokens share the experts."""
    if ctx.seq_id is None:
        raise ValueError("sentence gating needs the tokens' sequence ids")
    seqs, inv = np.unique(ctx.seq_id, return_inverse=True)
    sums = np.zeros((seqs.size, scores.shape[1]))
    np.add.at(sums, inv, scores)
    per_seq = top_indices(sums / np.bincount(inv)[:, None], ctx.top_k)
    return per_seq[inv]


def aux_loss(scores: np.ndarray, experts: np.ndarray) -> float:
    """Switch Transformer's load-balancing loss ``E * sum_i f_i P_i`` (1.0 = balanced)."""
    e = scores.shape[1]
    valid = experts[experts >= 0]
    if not valid.size:
        return 0.0
    f = np.bincount(valid, minlength=e) / valid.size
    p = softmax(scores).mean(axis=0)
    return float(e * (f * p).sum())


def gate_weights(scores: np.ndarray, experts: np.ndarray) -> np.ndarray:
    """Router probabilities of the chosen experts, renormalised per token (0 for -1)."""
    probs = softmax(scores)
    w = np.where(experts >= 0, np.take_along_axis(probs, np.maximum(experts, 0), axis=1), 0.0)
    total = w.sum(axis=1, keepdims=True)
    return np.divide(w, total, out=np.zeros_like(w), where=total > 0)
