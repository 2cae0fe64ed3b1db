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

from dataclasses import dataclass, replace

import numpy as np

from moesim.policies.capacity import DROP_POLICIES, get_capacity, keep_mask, reroute
from moesim.policies.placement import Placement
from moesim.policies.replicas import ReplicaChooser
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
    expert_routed: np.ndarray
    dropped_by_bin: np.ndarray
    padding: np.ndarray


@dataclass(frozen=True)
class CapacityRule:
    """Capacity settings: ``factor`` None means dropless.

    Attributes:
        factor: Capacity factor, or None (dropless).
        drop: Drop-policy registry name.
        num_experts: Experts per layer.
        top_k: Experts per token.
        scope: ``rank`` (Megatron, per source rank) or ``global`` (per EP group).
        pad: Pad every expert to its capacity (the padding is computed and sent).
        reroute_depth: Next choices a dropped assignment tries (``reroute`` policy).
    """

    factor: float | None
    drop: str
    num_experts: int
    top_k: int
    scope: str = "rank"
    pad: bool = False
    reroute_depth: int = 4

    def capacity(self, tokens_per_rank: int, ranks: int = 1) -> int | None:
        """Assignments one expert accepts (from one rank, or from the group), or None."""
        if self.factor is None:
            return None
        tokens = tokens_per_rank * (ranks if self.scope == "global" else 1)
        return get_capacity(tokens, self.top_k, self.factor, self.num_experts)

    @property
    def reroutes(self) -> bool:
        """Whether dropped assignments go to next choices."""
        return self.factor is not None and DROP_POLICIES.get(self.drop).reroute


COMPILED_MIN_ASSIGNMENTS = 1 << 20
"""Chunks of at least this many assignments are counted by the compiled pass
(:mod:`moesim.routing._count_jit`); smaller ones by numpy, which then costs less than loading
numba (about half a second per process)."""

Counted = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _count_compiled(
    slot: np.ndarray,
    keep: np.ndarray | None,
    experts: np.ndarray,
    valid: np.ndarray,
    slot_rank: np.ndarray,
    rank_node: np.ndarray,
    n_experts: int,
    table: tuple[np.ndarray, np.ndarray] | None = None,
    copies: bool = True,
) -> Counted:
    """:func:`count_routed_numpy` in one compiled pass (the same integers); with ``table``
    (the chooser's :meth:`~moesim.policies.replicas.ReplicaChooser.slot_table` and the
    chunk's layers) it looks each slot up instead of reading ``slot``."""
    from moesim.routing._count_jit import count_routed

    lookup, layers = (np.zeros(1, np.int32), np.zeros(1, np.int64)) if table is None else table
    return count_routed(
        np.ascontiguousarray(slot),
        np.ones((1, 1, 1, 1), dtype=bool) if keep is None else np.ascontiguousarray(keep),
        keep is None,
        np.ascontiguousarray(experts),
        np.ascontiguousarray(valid),
        slot_rank.astype(np.int64),
        rank_node.astype(np.int64),
        int(rank_node.max()) + 1,
        n_experts,
        lookup.ravel(),
        layers.astype(np.int64),
        copies,
    )


def count_routed_numpy(
    slot: np.ndarray,
    keep: np.ndarray | None,
    experts: np.ndarray,
    valid: np.ndarray,
    slot_rank: np.ndarray,
    rank_node: np.ndarray,
    n_experts: int,
    copies: bool = True,
) -> Counted:
    """Counts of ``[layers, ranks, tokens, k]`` assignments: ``(assignments [L, R, R],
    slot_tokens [L, slots], rank_copies [L, R, R], node_copies [L, R, nodes],
    expert_routed [L, E])`` (see :func:`moesim.routing._count_jit.count_routed`; without
    ``copies`` the two copies arrays are ``[L, 0, 0]``)."""
    n_layers, ranks = slot.shape[:2]
    slots = slot_rank.size
    if keep is None:
        dest_rank = slot_rank.astype(np.int32).take(slot)
        dest_node = rank_node.astype(np.int32).take(dest_rank)
    else:
        dest_rank = np.where(keep, slot_rank.astype(np.int32).take(slot), -1)
        dest_node = np.where(keep, rank_node.astype(np.int32).take(np.maximum(dest_rank, 0)), -1)
    local = np.arange(n_layers, dtype=np.int64).reshape(-1, 1, 1, 1) * slots + slot
    lay_e = np.arange(n_layers).reshape(-1, 1, 1, 1) * n_experts + experts
    expert_routed = np.bincount(lay_e[valid], minlength=n_layers * n_experts)
    kept_local = local.ravel() if keep is None else local[keep]
    slot_tokens = np.bincount(kept_local, minlength=n_layers * slots)
    pair = (np.arange(n_layers * ranks, dtype=np.int64) * ranks).reshape(n_layers, ranks, 1, 1)
    pair = pair + dest_rank
    assignments = np.bincount(pair[dest_rank >= 0], minlength=n_layers * ranks * ranks)
    none = np.zeros((n_layers, 0, 0), dtype=np.int64)
    return (
        assignments.reshape(n_layers, ranks, ranks),
        slot_tokens.reshape(n_layers, slots),
        _distinct_counts(dest_rank, ranks) if copies else none,
        _distinct_counts(dest_node, int(rank_node.max()) + 1) if copies else none,
        expert_routed.reshape(n_layers, n_experts),
    )


def _distinct_counts(dest: np.ndarray, n_dest: int) -> np.ndarray:
    """``[layers, ranks, n_dest]`` tokens sent to each non-negative destination of
    ``[layers, ranks, tokens, k]`` ``dest``, once per token."""
    layers, ranks = dest.shape[:2]
    first = first_of_kind(dest) & (dest >= 0)
    base = (np.arange(layers * ranks, dtype=np.int64) * n_dest).reshape(layers, ranks, 1, 1)
    group = (base + dest)[first]
    return np.bincount(group, minlength=layers * ranks * n_dest).reshape(layers, ranks, n_dest)


def count_layers(
    draw: RoutingDraw,
    layers: np.ndarray,
    placement: Placement,
    chooser: ReplicaChooser,
    rule: CapacityRule,
    rank_node: np.ndarray,
    rng: np.random.Generator | None = None,
    pos_bin: np.ndarray | None = None,
    bins: int = 1,
    copies: bool = True,
) -> LayerCounts:
    """Apply capacity (and rerouting), choose replicas and count.

    Args:
        draw: Assignments ``[layers, ranks, tokens, k]`` of the chunk (``fallback`` needed by
            the ``reroute`` policy).
        layers: ``[layers]`` indices of the chunk's MoE layers.
        placement: The placement of all MoE layers.
        chooser: The replica chooser of the placement.
        rule: Capacity settings.
        rank_node: ``[ranks]`` node of each EP rank.
        rng: Generator of the ``random`` drop policy.
        pos_bin: ``[ranks, tokens]`` position bin of each token (for drops by position).
        bins: Position bins.
        copies: Count tokens per destination rank and node (``rank_copies``,
            ``node_copies``; ``[L, 0, 0]`` without: for an all-to-all that does not read them,
            :attr:`moesim.comm.alltoall.AllToAll.reads_copies`).
    """
    n_layers, ranks, tokens, _ = draw.experts.shape
    cap = rule.capacity(tokens, ranks)
    experts, keep, valid = apply_capacity(draw, rule, cap, rng)
    args = (keep, experts, valid, placement.slot_rank, rank_node, rule.num_experts)
    table = chooser.slot_table() if experts.size >= COMPILED_MIN_ASSIGNMENTS else None
    if table is not None:  # slots looked up as the compiled pass counts
        empty = np.empty((0, 0, 0, 0), np.int32)
        counted = _count_compiled(empty, *args, (table, layers), copies)
    elif experts.size >= COMPILED_MIN_ASSIGNMENTS:
        counted = _count_compiled(chooser.slots(layers, experts, keep), *args, None, copies)
    else:
        counted = count_routed_numpy(chooser.slots(layers, experts, keep), *args, copies)
    assignments, slot_tokens, rank_copies, node_copies, expert_routed = counted
    dropped, dropped_by_bin = _drops(valid, keep, pos_bin, bins)
    counts = LayerCounts(
        assignments=assignments,
        slot_tokens=slot_tokens.reshape(n_layers, ranks, placement.slots_per_rank),
        routed=(
            np.full((n_layers, ranks), tokens * valid.shape[3], dtype=np.int64)
            if valid.all()  # (a pass over bools: far cheaper than summing them by row)
            else valid.sum(axis=(2, 3)).astype(np.int64)
        ),
        dropped=dropped,
        rank_copies=rank_copies,
        node_copies=node_copies,
        expert_routed=expert_routed,
        dropped_by_bin=dropped_by_bin,
        padding=np.zeros((n_layers, ranks, placement.slots_per_rank), dtype=np.int64),
    )
    if rule.pad and cap is not None:
        counts = _padded(counts, cap, rule, placement, layers, rank_node)
    return counts


def apply_capacity(
    draw: RoutingDraw, rule: CapacityRule, cap: int | None, rng: np.random.Generator | None
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """``(experts, keep, valid)`` of ``[L, R, T, k]`` assignments after capacity and rerouting.

    ``keep`` is None when nothing is dropped; ``valid`` is False where a gate (expert choice)
    left a token fewer experts (those entries are neither routed nor dropped).
    """
    experts = draw.experts
    valid = experts >= 0
    partial = not bool(valid.all())
    keep = None
    if partial:
        if cap is not None:
            raise ValueError("capacity cannot apply to gates that leave tokens without experts")
        experts = np.where(valid, experts, 0)
    if cap is not None:
        keep = keep_mask(experts, cap, rule.num_experts, rule.drop, draw.weights, rng, rule.scope)
        if rule.reroutes and draw.fallback is not None:
            experts, keep = reroute(experts, keep, draw.fallback, cap, rule.num_experts, rule.scope)
    if partial:
        keep = valid
    return experts, keep, valid


def _drops(
    valid: np.ndarray, keep: np.ndarray | None, pos_bin: np.ndarray | None, bins: int
) -> tuple[np.ndarray, np.ndarray]:
    """``([L, R] dropped, [L, bins] dropped by position bin)`` of the chunk."""
    n_layers, ranks, tokens, _ = valid.shape
    if keep is None:
        return (
            np.zeros((n_layers, ranks), dtype=np.int64),
            np.zeros((n_layers, bins), dtype=np.int64),
        )
    lost = (valid & ~keep).sum(axis=3)  # [L, R, T]
    pb = np.zeros((ranks, tokens), dtype=np.int64) if pos_bin is None else pos_bin
    flat_bin = (np.arange(n_layers).reshape(-1, 1, 1) * bins + pb).ravel()
    by_bin = np.bincount(flat_bin, weights=lost.ravel(), minlength=n_layers * bins)
    return lost.sum(axis=2).astype(np.int64), by_bin.astype(np.int64).reshape(n_layers, bins)


def _padded(
    counts: LayerCounts,
    cap: int,
    rule: CapacityRule,
    placement: Placement,
    layers: np.ndarray,
    rank_node: np.ndarray,
) -> LayerCounts:
    """``counts`` with every (source rank, expert) buffer padded to the capacity: per-expert
    rows travel undeduplicated, and each slot computes its share of the padded rows."""
    n_layers, ranks, spr = counts.slot_tokens.shape
    per_src = cap if rule.scope == "rank" else -(-cap // ranks)
    logcnt = placement.logcnt(rule.num_experts)[layers]  # [L, E]
    replicas = np.take_along_axis(logcnt, placement.phy2log[layers], axis=1)  # [L, slots]
    padded = np.ceil(per_src * ranks / replicas).astype(np.int64).reshape(n_layers, ranks, spr)
    padding = np.maximum(padded - counts.slot_tokens, 0)
    per_rank = (1.0 / replicas).reshape(n_layers, ranks, spr).sum(axis=2)  # buffers per source
    pad_pairs = np.ceil(per_src * per_rank).astype(np.int64)[:, None, :]
    assignments = np.maximum(counts.assignments, pad_pairs)
    node_copies = np.stack(
        [assignments[:, :, rank_node == n].sum(axis=2) for n in range(int(rank_node.max()) + 1)],
        axis=2,
    )
    return replace(
        counts,
        slot_tokens=counts.slot_tokens + padding,
        padding=padding,
        assignments=assignments,
        rank_copies=assignments.copy(),
        node_copies=node_copies,
    )
