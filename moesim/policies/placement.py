"""Expert placement: which EP rank holds each expert (and, later, its replicas).

Vocabulary (as in deepseek-ai/EPLB): a *physical slot* is one expert copy on one rank; ranks hold
``slots_per_rank`` consecutive slots, so slot ``s`` lives on rank ``s // slots_per_rank``.

- ``phy2log``: ``[layers, ranks * slots_per_rank]`` int, the logical expert in each slot;
- ``log2phy``: ``[layers, experts, max_replicas]`` int, the slots of each expert (-1 padded);
- ``logcnt``: ``[layers, experts]`` int, replicas per expert.

A placement policy is a pure function ``(loads [layers, experts] float, ranks int) -> phy2log``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from moesim.registry import Registry

PlacementFn = Callable[[np.ndarray, int], np.ndarray]
PLACEMENTS: Registry[PlacementFn] = Registry("placement")


@dataclass(frozen=True)
class Placement:
    """A placement of every MoE layer's experts on the EP ranks.

    Attributes:
        phy2log: ``[layers, slots]`` int64, logical expert of each physical slot.
        ranks: EP ranks.
    """

    phy2log: np.ndarray
    ranks: int

    @property
    def slots_per_rank(self) -> int:
        """Physical slots on each rank."""
        return int(self.phy2log.shape[1] // self.ranks)

    @property
    def slot_rank(self) -> np.ndarray:
        """``[slots]`` int64, the rank of each slot."""
        return np.arange(self.phy2log.shape[1]) // self.slots_per_rank

    def logcnt(self, num_experts: int) -> np.ndarray:
        """``[layers, experts]`` replicas per expert."""
        rows = [np.bincount(r, minlength=num_experts) for r in self.phy2log]
        return np.stack(rows)

    def log2phy(self, num_experts: int) -> np.ndarray:
        """``[layers, experts, max_replicas]`` slots of each expert, -1 padded."""
        layers, slots = self.phy2log.shape
        cnt = self.logcnt(num_experts)
        out = np.full((layers, num_experts, int(cnt.max())), -1, dtype=np.int64)
        for layer in range(layers):
            order = np.argsort(self.phy2log[layer], kind="stable")
            experts = self.phy2log[layer, order]
            starts = np.searchsorted(experts, np.arange(num_experts))
            replica = np.arange(slots) - starts[experts]
            out[layer, experts, replica] = order
        return out


def make_placement(name: str, loads: np.ndarray, ranks: int) -> Placement:
    """Run the placement policy ``name`` and check its invariants.

    Args:
        name: Registry name.
        loads: ``[layers, experts]`` float, expected tokens per expert (uniform if unknown).
        ranks: EP ranks.

    Raises:
        ValueError: the policy broke an invariant (an expert without a replica, unequal slots).
    """
    phy2log = np.asarray(PLACEMENTS.get(name)(loads, ranks), dtype=np.int64)
    layers, experts = loads.shape
    if phy2log.shape[0] != layers or phy2log.shape[1] % ranks:
        raise ValueError(
            f"placement {name}: phy2log shape {phy2log.shape} does not split over {ranks} ranks"
        )
    for layer in range(layers):
        if np.unique(phy2log[layer]).size != experts:
            raise ValueError(f"placement {name}: layer {layer} leaves an expert without a slot")
    return Placement(phy2log=phy2log, ranks=ranks)


@PLACEMENTS.register("contiguous")
def contiguous(loads: np.ndarray, ranks: int) -> np.ndarray:
    """Experts ``[r*E/R, (r+1)*E/R)`` on rank ``r`` in every layer (Megatron's default).

    Args:
        loads: ``[layers, experts]`` (only its shape is used).
        ranks: EP ranks; must divide the expert count.

    Returns:
        ``[layers, experts]`` phy2log.
    """
    layers, experts = loads.shape
    if experts % ranks:
        raise ValueError(f"contiguous placement needs ep ({ranks}) to divide experts ({experts})")
    return np.tile(np.arange(experts), (layers, 1))
