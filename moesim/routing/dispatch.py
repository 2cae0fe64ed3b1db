"""From assignments to what the hardware sees: tokens per GPU slot and token copies per link.

For one chunk of MoE layers of one replica:

- ``slot_tokens``: ``[layers, ranks, slots_per_rank]`` int64, assignments each physical expert
  slot computes (after drops);
- ``routed`` / ``dropped``: ``[layers, ranks]`` int64, assignments made / dropped at each source
  rank (routed = computed + dropped);
- ``rank_copies``: ``[layers, ranks, ranks]`` int64, token copies sent from rank ``s`` to rank
  ``d``: a token is sent once to each distinct destination rank holding one of its kept
  experts (diagonal: tokens that stay on their rank);
- ``node_copies``: ``[layers, ranks, nodes]`` int64, the same deduplicated per destination node
  (what a hierarchical all-to-all sends over RDMA);
- ``assignments``: ``[layers, ranks, ranks]`` int64, kept token-expert assignments from rank
  ``s`` to rank ``d`` without deduplication (what per-expert messages carry).

Bytes are these counts times the bytes of one token in the dispatch or combine dtype
(:func:`moesim.dtypes.token_bytes`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moesim.policies.capacity import get_capacity, keep_mask
from moesim.policies.placement import Placement
from moesim.routing.sources import RoutingDraw, first_of_kind


@dataclass(frozen=True)
class LayerCounts:
    """Counts of one chunk of MoE layers (shapes in the module docstring)."""

    slot_tokens: np.ndarray
    routed: np.ndarray
    dropped: np.ndarray
    rank_copies: np.ndarray
    node_copies: np.ndarray
    assignments: np.ndarray


@dataclass(frozen=True)
class CapacityRule:
    """Capacity settings: ``factor`` None means dropless."""

    factor: float | None
    drop: str
    num_experts: int
    top_k: int

    def capacity(self, tokens_per_rank: int) -> int | None:
        """Assignments one expert accepts from one rank, or None (dropless)."""
        if self.factor is None:
            return None
        return get_capacity(tokens_per_rank, self.top_k, self.factor, self.num_experts)


def _distinct_counts(dest: np.ndarray, n_dest: int) -> np.ndarray:
    """Count distinct non-negative destinations per token.

    Args:
        dest: ``[layers, ranks, tokens, k]`` int, destination per assignment, -1 for none.
        n_dest: Number of destinations.

    Returns:
        ``[layers, ranks, n_dest]`` int64, tokens sent to each destination (once per token).
    """
    layers, ranks = dest.shape[:2]
    first = first_of_kind(dest) & (dest >= 0)
    base = (np.arange(layers * ranks, dtype=np.int64) * n_dest).reshape(layers, ranks, 1, 1)
    group = (base + dest)[first]
    return np.bincount(group, minlength=layers * ranks * n_dest).reshape(layers, ranks, n_dest)


def count_layers(
    draw: RoutingDraw,
    layers: np.ndarray,
    placement: Placement,
    log2phy: np.ndarray,
    logcnt: np.ndarray,
    rule: CapacityRule,
    rank_node: np.ndarray,
) -> LayerCounts:
    """Apply capacity, choose replicas (round-robin by token) and count.

    Args:
        draw: Assignments ``[layers, ranks, tokens, k]`` of the chunk.
        layers: ``[layers]`` indices of the chunk's MoE layers.
        placement: The placement of all MoE layers.
        log2phy: ``[moe_layers, experts, max_replicas]`` from the placement.
        logcnt: ``[moe_layers, experts]`` from the placement.
        rule: Capacity settings.
        rank_node: ``[ranks]`` node of each EP rank.
    """
    experts = draw.experts
    n_layers, ranks, tokens, _ = experts.shape
    cap = rule.capacity(tokens)
    keep = (
        None if cap is None else keep_mask(experts, cap, rule.num_experts, rule.drop, draw.weights)
    )
    num_experts = log2phy.shape[1]
    key = layers.astype(np.int32).reshape(-1, 1, 1, 1) * num_experts + experts
    if log2phy.shape[2] == 1:  # one replica per expert: a table lookup
        slot = log2phy[:, :, 0].astype(np.int32).ravel().take(key)
    else:  # round-robin over an expert's replicas by token index
        replica = np.arange(tokens).reshape(1, 1, -1, 1) % logcnt.ravel().take(key)
        slot = log2phy[layers.reshape(-1, 1, 1, 1), experts, replica].astype(np.int32)
    slots = placement.phy2log.shape[1]
    local = np.arange(n_layers, dtype=np.int32).reshape(-1, 1, 1, 1) * slots + slot
    slot_rank = placement.slot_rank.astype(np.int32)
    if keep is None:
        slot_tokens = np.bincount(local.ravel(), minlength=n_layers * slots)
        dest_rank = slot_rank.take(slot)
        dest_node = rank_node.astype(np.int32).take(dest_rank)
        dropped = np.zeros((n_layers, ranks), dtype=np.int64)
    else:
        slot_tokens = np.bincount(local[keep], minlength=n_layers * slots)
        dest_rank = np.where(keep, slot_rank.take(slot), -1)
        dest_node = np.where(keep, rank_node.astype(np.int32).take(np.maximum(dest_rank, 0)), -1)
        dropped = (~keep).sum(axis=(2, 3)).astype(np.int64)
    slot_tokens = slot_tokens.reshape(n_layers, ranks, placement.slots_per_rank)
    routed = np.full((n_layers, ranks), tokens * experts.shape[3], dtype=np.int64)
    n_nodes = int(rank_node.max()) + 1
    pair = (np.arange(n_layers * ranks, dtype=np.int64) * ranks).reshape(n_layers, ranks, 1, 1)
    pair = pair + dest_rank
    assignments = np.bincount(pair[dest_rank >= 0], minlength=n_layers * ranks * ranks)
    return LayerCounts(
        assignments=assignments.reshape(n_layers, ranks, ranks),
        slot_tokens=slot_tokens,
        routed=routed,
        dropped=dropped,
        rank_copies=_distinct_counts(dest_rank, ranks),
        node_copies=_distinct_counts(dest_node, n_nodes),
    )
