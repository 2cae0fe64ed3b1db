"""Replica choice: which copy of a replicated expert each token-expert assignment goes to.

A chooser is built once per placement by a factory registered under the scenario's
``policies.placement.replica_choice`` name, and maps assignments to physical slots:

- ``round_robin``: the i-th token of a rank takes replica ``i % replicas``;
- ``nearest``: only the replicas closest to the token's rank (same rank, else same node, else
  any), round-robin among them;
- ``least_loaded``: each replicated expert's tokens of the step are split over its replicas so
  that the GPUs' totals come out as even as possible (water-filling, heaviest expert first),
  every source rank splitting its tokens in those shares; this is what a load-aware dispatcher
  reaches with perfect knowledge of the step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np

from moesim.policies.capacity import occurrence
from moesim.policies.placement import Placement
from moesim.registry import Registry


class ReplicaChooser(Protocol):
    """Maps assignments to physical slots."""

    def slots(self, layers: np.ndarray, experts: np.ndarray, keep: np.ndarray | None) -> np.ndarray:
        """``[L, R, T, k]`` int32 slot of each assignment.

        Args:
            layers: ``[L]`` MoE-layer indices of the chunk.
            experts: ``[L, R, T, k]`` expert ids (token order on each source rank).
            keep: ``[L, R, T, k]`` assignments that survive capacity, or None (all).
        """
        ...

    def slot_table(self) -> np.ndarray | None:
        """``[moe_layers, experts]`` int32 the slot of every assignment of a layer and expert,
        where it depends on nothing else (one replica each), else None: then the counting
        pass looks slots up as it goes instead of reading :meth:`slots`."""
        ...


ChooserFactory = Callable[[Placement, int, np.ndarray], ReplicaChooser]
REPLICA_CHOICES: Registry[ChooserFactory] = Registry("replica choice")


class TableChooser:
    """Round-robin over a per-(layer, expert, source rank) list of candidate slots.

    Args:
        choice: ``[layers, experts, ranks, max_replicas]`` candidate slots, best first.
        count: ``[layers, experts, ranks]`` candidates used (the first ``count``).
    """

    def __init__(self, choice: np.ndarray, count: np.ndarray) -> None:
        self.choice, self.count = choice.astype(np.int32), count.astype(np.int64)
        self.single = bool((count == 1).all())

    def slot_table(self) -> np.ndarray | None:
        """See :class:`ReplicaChooser`: the single replica's slot of each (layer, expert)."""
        return np.ascontiguousarray(self.choice[:, :, 0, 0]) if self.single else None

    def slots(self, layers: np.ndarray, experts: np.ndarray, keep: np.ndarray | None) -> np.ndarray:
        """Slot per assignment (see :class:`ReplicaChooser`)."""
        _, ranks, tokens, _ = experts.shape
        lay = layers.reshape(-1, 1, 1, 1)
        src = np.arange(ranks).reshape(1, -1, 1, 1)
        if self.single:  # one replica per expert: a table lookup
            key = layers.astype(np.int64).reshape(-1, 1, 1, 1) * self.choice.shape[1] + experts
            return self.choice[:, :, 0, 0].ravel().take(key)
        replica = np.arange(tokens).reshape(1, 1, -1, 1) % self.count[lay, experts, src]
        return self.choice[lay, experts, src, replica]


def _round_robin_table(placement: Placement, num_experts: int, ranks: int) -> TableChooser:
    log2phy = placement.log2phy(num_experts)
    choice = np.repeat(log2phy[:, :, None, :], ranks, axis=2)
    count = np.repeat(placement.logcnt(num_experts)[:, :, None], ranks, axis=2)
    return TableChooser(choice, count)


@REPLICA_CHOICES.register("round_robin")
def round_robin(placement: Placement, num_experts: int, rank_node: np.ndarray) -> ReplicaChooser:
    """Replica ``i % replicas`` for the i-th token of a rank."""
    return _round_robin_table(placement, num_experts, placement.ranks)


@REPLICA_CHOICES.register("nearest")
def nearest(placement: Placement, num_experts: int, rank_node: np.ndarray) -> ReplicaChooser:
    """The closest replicas (same rank, same node, other node), round-robin among them."""
    log2phy = placement.log2phy(num_experts)  # [L, E, M]
    ranks = placement.ranks
    slot_rank = placement.slot_rank[np.maximum(log2phy, 0)]  # [L, E, M]
    src = np.arange(ranks).reshape(1, 1, -1, 1)
    dst = slot_rank[:, :, None, :]
    dist = np.where(dst == src, 0, np.where(rank_node[dst] == rank_node[src], 1, 2))
    dist = np.where(log2phy[:, :, None, :] >= 0, dist, 3)  # padding last
    order = np.argsort(dist, axis=-1, kind="stable")
    choice = np.take_along_axis(np.repeat(log2phy[:, :, None, :], ranks, axis=2), order, -1)
    best = np.take_along_axis(dist, order, -1)
    count = (best == best[..., :1]).sum(axis=-1)
    return TableChooser(choice, count)


class LeastLoaded:
    """Water-filled shares per replica, recomputed from each step's counts."""

    def __init__(self, placement: Placement, num_experts: int) -> None:
        self.placement, self.e = placement, num_experts
        self.log2phy = placement.log2phy(num_experts)
        self.logcnt = placement.logcnt(num_experts)
        self.table = _round_robin_table(placement, num_experts, 1)

    def shares(self, layer: int, totals: np.ndarray) -> np.ndarray:
        """``[E, M]`` share of each replica of each expert for one layer's ``totals [E]``."""
        p = self.placement
        slot_rank = p.slot_rank
        cnt, log2phy = self.logcnt[layer], self.log2phy[layer]
        out = np.zeros(log2phy.shape)
        out[:, 0] = 1.0
        rank_load = np.zeros(p.ranks)
        single = cnt == 1
        np.add.at(rank_load, slot_rank[log2phy[single, 0]], totals[single])
        for e in np.argsort(-np.where(single, -1, totals), kind="stable"):
            if cnt[e] == 1:
                break
            ranks_of = slot_rank[log2phy[e, : cnt[e]]]
            holders, per_holder = np.unique(ranks_of, return_counts=True)
            share = _water_fill(rank_load[holders], float(totals[e]))
            rank_load[holders] += share * totals[e]
            # a rank's share is split evenly between its copies of the expert
            out[e, : cnt[e]] = (share / per_holder)[np.searchsorted(holders, ranks_of)]
        return out

    def slot_table(self) -> None:
        """Shares change with each step's loads: slots are chosen per assignment."""
        return None

    def slots(self, layers: np.ndarray, experts: np.ndarray, keep: np.ndarray | None) -> np.ndarray:
        """Slot per assignment (see :class:`ReplicaChooser`)."""
        if self.table.single:
            return self.table.slots(layers, experts, keep)
        n_layers, ranks, tokens, k = experts.shape
        kept = np.ones(experts.shape, dtype=bool) if keep is None else keep
        flat = experts.reshape(n_layers, ranks, -1).astype(np.int64)
        group = (np.arange(n_layers * ranks).reshape(n_layers, ranks, 1) * self.e + flat).ravel()
        occ = occurrence(group)
        counts = np.bincount(group, minlength=n_layers * ranks * self.e)
        kept_counts = np.bincount(group[kept.ravel()], minlength=counts.size)
        totals = kept_counts.reshape(n_layers, ranks, self.e).sum(axis=1)
        cum = np.stack(
            [np.cumsum(self.shares(int(li), totals[i]), axis=1) for i, li in enumerate(layers)]
        )  # [L, E, M]
        u = (occ + 0.5) / counts[group]
        lay = np.repeat(np.arange(n_layers), ranks * tokens * k)
        ex = flat.ravel()
        replica = (u[:, None] > cum[lay, ex]).sum(axis=1)
        replica = np.minimum(replica, self.logcnt[layers[lay], ex] - 1)
        return self.log2phy[layers[lay], ex, replica].astype(np.int32).reshape(experts.shape)


def _water_fill(levels: np.ndarray, amount: float) -> np.ndarray:
    """Shares of ``amount`` poured onto bins at ``levels`` so the lowest rise together."""
    if amount <= 0:
        return np.full(levels.size, 1.0 / levels.size)
    order = np.sort(levels)
    fill = levels.max() + amount  # fallback: everything above the highest
    for i in range(1, levels.size + 1):
        level = (order[:i].sum() + amount) / i
        if i == levels.size or level <= order[i]:
            fill = level
            break
    return np.maximum(fill - levels, 0.0) / amount


@REPLICA_CHOICES.register("least_loaded")
def least_loaded(placement: Placement, num_experts: int, rank_node: np.ndarray) -> ReplicaChooser:
    """Replica shares that even out the GPUs' loads of the step."""
    return LeastLoaded(placement, num_experts)
