"""Expert capacity and drop policies (Megatron-Core semantics).

Capacity is counted per EP rank before the exchange::

    capacity = ceil(tokens_on_rank * top_k * capacity_factor / num_experts)

A drop policy is a pure function that, given one rank's assignments in token order, returns a
key per assignment: assignments are kept in ascending key order until the expert is full.
``position`` keeps the earliest tokens (so drops fall towards the end of sequences); ``probs``
keeps the assignments with the highest gate weights (Switch Transformer's batch prioritised
routing; ties go to the earlier token).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from moesim.registry import Registry

DropKeyFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
DROP_POLICIES: Registry[DropKeyFn] = Registry("drop policy")


def get_capacity(num_tokens: int, top_k: int, factor: float, num_experts: int) -> int:
    """Tokens one expert accepts from one rank: ``ceil(tokens * top_k * factor / experts)``."""
    return math.ceil(num_tokens * top_k * factor / num_experts)


@DROP_POLICIES.register("position")
def position_key(order: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Keep the earliest tokens: the key is the token's place in the rank's batch order.

    Args:
        order: ``[n]`` int, position of each assignment in token order.
        weights: ``[n]`` float gate weights (unused).
    """
    return order


@DROP_POLICIES.register("probs")
def probs_key(order: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Keep the highest gate weights: the key is the negated weight (stable in token order)."""
    return -weights


def keep_mask(
    experts: np.ndarray,
    capacity: int,
    num_experts: int,
    policy: str,
    weights: np.ndarray | None = None,
) -> np.ndarray:
    """Which assignments an expert accepts under ``capacity``.

    Args:
        experts: ``[layers, ranks, tokens, k]`` int expert ids, tokens in batch order.
        capacity: Assignments one expert accepts from one rank.
        num_experts: Experts per layer.
        policy: Drop-policy registry name.
        weights: ``[layers, ranks, tokens, k]`` gate weights, or None.

    Returns:
        ``[layers, ranks, tokens, k]`` bool, True where the assignment is kept.
    """
    layers, ranks, tokens, k = experts.shape
    flat = experts.reshape(layers * ranks, tokens * k)
    w = np.zeros_like(flat, dtype=np.float64) if weights is None else weights.reshape(flat.shape)
    order = np.broadcast_to(np.arange(tokens * k), flat.shape)
    key = DROP_POLICIES.get(policy)(order, w)
    group = np.arange(layers * ranks)[:, None] * num_experts + flat
    # Sort by (group, key): rank of each assignment within its (layer, rank, expert) group.
    idx = np.lexsort((key.ravel(), group.ravel()))
    g_sorted = group.ravel()[idx]
    starts = np.searchsorted(g_sorted, g_sorted, side="left")
    occurrence = np.empty(idx.size, dtype=np.int64)
    occurrence[idx] = np.arange(idx.size) - starts
    return (occurrence < capacity).reshape(experts.shape)
