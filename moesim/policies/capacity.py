"""Expert capacity and drop policies (Megatron-Core semantics).

Capacity is counted per EP rank before the exchange (``scope: rank``, Megatron)::

    capacity = ceil(tokens_on_rank * top_k * capacity_factor / num_experts)

or over the whole EP group (``scope: global``: an expert accepts ``capacity`` assignments of
all ranks together, ranks served in rank order).

A drop policy gives a key per assignment; assignments are kept in ascending key order until
the expert is full:

- ``position`` keeps the earliest tokens (so drops fall towards the end of sequences);
- ``probs`` keeps the highest gate weights (Switch Transformer's batch prioritised routing;
  ties go to the earlier token);
- ``random`` keeps a uniformly random subset (seeded);
- ``reroute`` keeps the earliest tokens, then sends each dropped assignment to the token's next
  choice (the next experts in its preference order) that still has room, in token order, up to
  ``reroute_depth`` tries. The preference order is the router's: a trace's recorded logits, or
  the scores a re-gating policy routed by; where there are no scores, it is drawn from the
  layer's popularity (:func:`moesim.routing.sources.next_choices`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from moesim.registry import Registry

DropKeyFn = Callable[[np.ndarray, np.ndarray, np.random.Generator], np.ndarray]


@dataclass(frozen=True)
class DropPolicy:
    """A drop policy: the key it keeps assignments by, and whether drops are rerouted."""

    key: DropKeyFn
    reroute: bool = False


DROP_POLICIES: Registry[DropPolicy] = Registry("drop policy")


def get_capacity(num_tokens: int, top_k: int, factor: float, num_experts: int) -> int:
    """Tokens one expert accepts from one rank: ``ceil(tokens * top_k * factor / experts)``."""
    return math.ceil(num_tokens * top_k * factor / num_experts)


def position_key(order: np.ndarray, weights: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Keep the earliest tokens: the key is the assignment's place in the rank's batch order.

    Args:
        order: ``[rows, n]`` int, position of each assignment in token order.
        weights: ``[rows, n]`` float gate weights.
        rng: The routing stage's generator.
    """
    return order


def probs_key(order: np.ndarray, weights: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Keep the highest gate weights: the key is the negated weight (stable in token order)."""
    return -weights


def random_key(order: np.ndarray, weights: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Keep a random subset: uniform keys."""
    return rng.random(order.shape)


DROP_POLICIES.register("position")(DropPolicy(position_key))
DROP_POLICIES.register("probs")(DropPolicy(probs_key))
DROP_POLICIES.register("random")(DropPolicy(random_key))
DROP_POLICIES.register("reroute")(DropPolicy(position_key, reroute=True))


def occurrence(group: np.ndarray, key: np.ndarray | None = None) -> np.ndarray:
    """Rank of each element within its group, in ascending ``key`` (then index) order.

    Args:
        group: ``[n]`` int group of each element.
        key: ``[n]`` sort key within a group; None keeps the elements' order.

    Returns:
        ``[n]`` int64, 0 for the first element of its group, 1 for the next, ...
    """
    idx = np.argsort(group, kind="stable") if key is None else np.lexsort((key, group))
    g_sorted = group[idx]
    starts = np.searchsorted(g_sorted, g_sorted, side="left")
    occ = np.empty(idx.size, dtype=np.int64)
    occ[idx] = np.arange(idx.size) - starts
    return occ


def keep_mask(
    experts: np.ndarray,
    capacity: int,
    num_experts: int,
    policy: str,
    weights: np.ndarray | None = None,
    rng: np.random.Generator | None = None,
    scope: str = "rank",
) -> np.ndarray:
    """Which assignments an expert accepts under ``capacity``.

    Args:
        experts: ``[layers, ranks, tokens, k]`` int expert ids, tokens in batch order.
        capacity: Assignments one expert accepts (from one rank, or from all with ``global``).
        num_experts: Experts per layer.
        policy: Drop-policy registry name.
        weights: ``[layers, ranks, tokens, k]`` gate weights, or None.
        rng: Generator for the ``random`` policy.
        scope: ``rank`` (Megatron: per source rank) or ``global`` (per EP group).

    Returns:
        ``[layers, ranks, tokens, k]`` bool, True where the assignment is kept.
    """
    layers, ranks, tokens, k = experts.shape
    flat = experts.reshape(layers * ranks, tokens * k).astype(np.int64)
    w = np.zeros(flat.shape) if weights is None else weights.reshape(flat.shape)
    order = np.broadcast_to(np.arange(tokens * k), flat.shape)
    if scope == "global":  # one group per (layer, expert): ranks in order
        order = order + (np.arange(layers * ranks) % ranks)[:, None] * (tokens * k)
        owner = np.arange(layers * ranks)[:, None] // ranks
    else:
        owner = np.arange(layers * ranks)[:, None]
    gen = rng if rng is not None else np.random.default_rng(0)
    key = DROP_POLICIES.get(policy).key(order, w, gen)
    group = owner * num_experts + flat
    return (occurrence(group.ravel(), np.asarray(key).ravel()) < capacity).reshape(experts.shape)


def reroute(
    experts: np.ndarray,
    keep: np.ndarray,
    fallback: np.ndarray,
    capacity: int,
    num_experts: int,
    scope: str = "rank",
) -> tuple[np.ndarray, np.ndarray]:
    """Send dropped assignments to the token's next choices that still have room.

    Each token's dropped slots, first to last, try the token's fallback experts in order
    (skipping experts the token already uses); within a try, tokens are served in batch order.

    Args:
        experts: ``[L, R, T, k]`` expert ids.
        keep: ``[L, R, T, k]`` kept after the first pass.
        fallback: ``[L, R, T, m]`` the token's next choices, best first.
        capacity: As in :func:`keep_mask`.
        num_experts: Experts per layer.
        scope: As in :func:`keep_mask`.

    Returns:
        ``(experts, keep)`` after rerouting (new arrays).
    """
    experts, keep = experts.astype(np.int64), keep.copy()
    layers, ranks, tokens, _ = experts.shape
    owner = np.arange(layers * ranks).reshape(layers, ranks, 1)
    if scope == "global":
        owner = owner // ranks
    base = owner * num_experts  # [L, R, 1]
    used = np.bincount((base[..., None] + experts)[keep], minlength=int(base.max()) + num_experts)
    tried = np.zeros((layers, ranks, tokens), dtype=np.int64)  # fallback index per token
    for _ in range(fallback.shape[-1]):
        dropped = ~keep
        need = dropped.any(axis=-1) & (tried < fallback.shape[-1])
        if not need.any():
            break
        li, ri, ti = np.nonzero(need)
        slot = np.argmax(dropped[li, ri, ti], axis=-1)
        cand = fallback[li, ri, ti, tried[li, ri, ti]].astype(np.int64)
        fresh = ~(experts[li, ri, ti] == cand[:, None]).any(axis=-1)
        group = base[li, ri, 0] + cand
        # serve this try's fresh candidates of a group in batch order (ranks in order if global)
        f = np.nonzero(fresh)[0]
        order_key = (ri[f] if scope == "global" else 0) * tokens + ti[f]
        occ = occurrence(group[f], order_key)
        a = f[occ < capacity - used[group[f]]]
        experts[li[a], ri[a], ti[a], slot[a]] = cand[a]
        keep[li[a], ri[a], ti[a], slot[a]] = True
        used += np.bincount(group[a], minlength=used.size)
        tried[li, ri, ti] += 1
    return experts, keep
