"""Expert-parallel load balancing as published in deepseek-ai/EPLB (MIT), written for numpy.

The algorithm (EPLB README; reproduced exactly on its worked example, see
``tests/policies/test_eplb.py``):

1. *hierarchical* (when the node count divides the expert-group count): pack the expert groups
   onto nodes with balanced greedy packing (heaviest group first, each to the lightest node that
   still has room), so that a group's experts share a node;
2. replicate within each node: every extra slot goes to the expert with the largest
   ``load / replicas``;
3. pack the physical experts of each node onto its GPUs the same balanced way.

*global* is the same with one group and one node (EPLB uses it when nodes do not divide groups).
"""

from __future__ import annotations

import numpy as np


def balanced_packing(weight: np.ndarray, packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Pack ``items`` weighted items into ``packs`` packs of ``items / packs`` items each.

    Heaviest item first (stable order on ties), each to the lightest pack that still has room
    (the first such pack on ties).

    Args:
        weight: ``[rows, items]`` item weights; every row is packed independently.
        packs: Packs per row; must divide ``items``.

    Returns:
        ``(pack_index, rank_in_pack)``, both ``[rows, items]`` int64.
    """
    rows, items = weight.shape
    if items % packs:
        raise ValueError(f"balanced packing: {packs} packs do not divide {items} items")
    per_pack = items // packs
    if per_pack == 1:
        idx = np.broadcast_to(np.arange(items), (rows, items)).copy()
        return idx, np.zeros_like(idx)
    pack_index = np.empty((rows, items), dtype=np.int64)
    rank_in_pack = np.empty((rows, items), dtype=np.int64)
    for i in range(rows):
        load = np.zeros(packs)
        count = np.zeros(packs, dtype=np.int64)
        for item in np.argsort(-weight[i], kind="stable"):
            open_load = np.where(count < per_pack, load, np.inf)
            pack = int(np.argmin(open_load))
            pack_index[i, item] = pack
            rank_in_pack[i, item] = count[pack]
            load[pack] += weight[i, item]
            count[pack] += 1
    return pack_index, rank_in_pack


def replicate_experts(
    weight: np.ndarray, num_physical: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Give each extra physical slot to the expert with the largest load per replica.

    Args:
        weight: ``[rows, logical]`` loads.
        num_physical: Physical slots per row (>= logical).

    Returns:
        ``(phy2log [rows, physical], replica_rank [rows, physical], logcnt [rows, logical])``.
    """
    rows, logical = weight.shape
    phy2log = np.tile(np.arange(num_physical), (rows, 1))
    rank = np.zeros((rows, num_physical), dtype=np.int64)
    logcnt = np.ones((rows, logical), dtype=np.int64)
    arange = np.arange(rows)
    for slot in range(logical, num_physical):
        best = np.argmax(weight / logcnt, axis=1)
        phy2log[:, slot] = best
        rank[:, slot] = logcnt[arange, best]
        logcnt[arange, best] += 1
    return phy2log, rank, logcnt


def _inverse(perm: np.ndarray) -> np.ndarray:
    inv = np.empty_like(perm)
    np.put_along_axis(inv, perm, np.broadcast_to(np.arange(perm.shape[1]), perm.shape), axis=1)
    return inv


def rebalance_hierarchical(
    weight: np.ndarray, num_physical: int, num_groups: int, num_nodes: int, num_gpus: int
) -> np.ndarray:
    """EPLB's hierarchical policy.

    Args:
        weight: ``[layers, logical]`` loads.
        num_physical: Physical slots per layer (logical + redundant).
        num_groups: Expert groups (DeepSeek-V3's n_group); must divide the experts.
        num_nodes: Nodes; must divide ``num_groups``.
        num_gpus: GPUs (EP ranks); a multiple of ``num_nodes`` dividing ``num_physical``.

    Returns:
        ``[layers, num_physical]`` phy2log.
    """
    layers, logical = weight.shape
    for what, a, b in (
        ("expert groups", num_groups, logical),
        ("nodes", num_nodes, num_groups),
        ("nodes", num_nodes, num_gpus),
        ("GPUs", num_gpus, num_physical),
    ):
        if b % a:
            raise ValueError(f"EPLB: {what} ({a}) must divide {b}")
    group_size = logical // num_groups
    groups_per_node = num_groups // num_nodes
    log_per_node = logical // num_nodes
    phy_per_gpu = num_physical // num_gpus

    # 1. expert groups -> nodes
    group_load = weight.reshape(layers, num_groups, group_size).sum(axis=-1)
    group_pack, group_rank = balanced_packing(group_load, num_nodes)
    log2mlog = (
        ((group_pack * groups_per_node + group_rank) * group_size)[:, :, None]
        + np.arange(group_size)
    ).reshape(layers, logical)
    mlog2log = _inverse(log2mlog)

    # 2. replicas within each node (rows = (layer, node))
    mlog_load = np.take_along_axis(weight, mlog2log, axis=1).reshape(-1, log_per_node)
    phy2mlog, _, mlogcnt = replicate_experts(mlog_load, num_physical // num_nodes)

    # 3. physical experts -> GPUs of the node
    phy_load = np.take_along_axis(mlog_load / mlogcnt, phy2mlog, axis=1)
    pack, rank = balanced_packing(phy_load, num_gpus // num_nodes)
    pphy2phy = _inverse(pack * phy_per_gpu + rank)
    pphy2mlog = np.take_along_axis(phy2mlog, pphy2phy, axis=1)
    offset = np.arange(0, logical, log_per_node).reshape(1, -1, 1)
    pphy2mlog = (pphy2mlog.reshape(layers, num_nodes, -1) + offset).reshape(layers, -1)
    return np.take_along_axis(mlog2log, pphy2mlog, axis=1)


def rebalance(
    weight: np.ndarray,
    num_physical: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    policy: str = "auto",
) -> np.ndarray:
    """EPLB: hierarchical when ``num_nodes`` divides ``num_groups`` (``auto``), else global.

    Returns:
        ``[layers, num_physical]`` phy2log.
    """
    weight = np.asarray(weight, dtype=np.float64)
    hierarchical = policy == "hierarchical" or (policy == "auto" and num_groups % num_nodes == 0)
    if hierarchical:
        return rebalance_hierarchical(weight, num_physical, num_groups, num_nodes, num_gpus)
    return rebalance_hierarchical(weight, num_physical, 1, 1, num_gpus)
