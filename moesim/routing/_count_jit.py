"""Compiled counting of a chunk's routed assignments (numba; imported on first use, cached
on disk).

numpy needs a dozen passes over every assignment to count what a chunk sends (destination
rank and node lookups, masks, a comparison per pair of slots for the distinct destinations,
five bincounts); one compiled pass does it all while a token's ``k`` slots sit in registers.
Counts are integers: the same as numpy's, exactly. Layers are counted in parallel (each
writes only its own rows).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(cache=True, parallel=True)
def count_routed(
    slot: np.ndarray,
    keep: np.ndarray,
    all_kept: bool,
    experts: np.ndarray,
    valid: np.ndarray,
    slot_rank: np.ndarray,
    rank_node: np.ndarray,
    n_nodes: int,
    n_experts: int,
    table: np.ndarray,
    layers: np.ndarray,
    copies: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Counts of ``[layers, ranks, tokens, k]`` assignments.

    Args:
        slot: Physical slot of each assignment (in its layer's ``slot_rank.size`` slots), or
            empty: then ``table`` (``[moe_layers x experts]`` flat) holds the slot of each
            (MoE layer, expert), looked up at ``layers[l] x experts + expert`` (what
            :meth:`moesim.policies.replicas.TableChooser.slots` reads with one replica).
        keep: Whether it survived capacity (not read when ``all_kept``).
        experts: Logical expert of each assignment; counted where ``valid``.
        valid: Whether the gate gave the slot an expert at all.
        slot_rank: ``[slots]`` rank of each slot; ``rank_node``: ``[ranks]`` node of each rank.
        copies: Count the tokens per destination rank and node (else those two come back
            ``[L, 0, 0]``: an all-to-all that does not read them skips the pass over every
            pair of a token's slots).

    Returns:
        ``(assignments [L, R, R], slot_tokens [L, slots], rank_copies [L, R, R],
        node_copies [L, R, nodes], expert_routed [L, E])``: kept assignments per (source,
        destination) rank and per slot, tokens per destination rank and node (once per token),
        valid assignments per expert.
    """
    n_layers, ranks, tokens, k = experts.shape
    by_table = slot.size == 0
    assignments = np.zeros((n_layers, ranks, ranks), np.int64)
    slot_tokens = np.zeros((n_layers, slot_rank.size), np.int64)
    rank_copies = np.zeros((n_layers, ranks if copies else 0, ranks if copies else 0), np.int64)
    node_copies = np.zeros((n_layers, ranks if copies else 0, n_nodes if copies else 0), np.int64)
    expert_routed = np.zeros((n_layers, n_experts), np.int64)
    for li in prange(n_layers):
        dr = np.empty(k, np.int64)
        dn = np.empty(k, np.int64)
        for r in range(ranks):
            for t in range(tokens):
                for j in range(k):
                    if valid[li, r, t, j]:
                        expert_routed[li, experts[li, r, t, j]] += 1
                    if not all_kept and not keep[li, r, t, j]:
                        dr[j] = -1
                        continue
                    if by_table:
                        s = table[layers[li] * n_experts + experts[li, r, t, j]]
                    else:
                        s = slot[li, r, t, j]
                    d = slot_rank[s]
                    dr[j] = d
                    dn[j] = rank_node[d]
                    assignments[li, r, d] += 1
                    slot_tokens[li, s] += 1
                for j in range(k if copies else 0):
                    if dr[j] < 0:
                        continue
                    new_rank = True
                    new_node = True
                    for i in range(j):
                        if dr[i] >= 0:
                            if dr[i] == dr[j]:
                                new_rank = False
                            if dn[i] == dn[j]:
                                new_node = False
                    if new_rank:
                        rank_copies[li, r, dr[j]] += 1
                    if new_node:
                        node_copies[li, r, dn[j]] += 1
    return assignments, slot_tokens, rank_copies, node_copies, expert_routed
