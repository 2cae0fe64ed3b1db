"""Expert placement: which EP rank holds each expert and its replicas.

Vocabulary (as in deepseek-ai/EPLB): a *physical slot* is one expert copy on one rank; ranks hold
``slots_per_rank`` consecutive slots, so slot ``s`` lives on rank ``s // slots_per_rank``.

- ``phy2log``: ``[layers, ranks * slots_per_rank]`` int, the logical expert in each slot;
- ``log2phy``: ``[layers, experts, max_replicas]`` int, the slots of each expert (-1 padded);
- ``logcnt``: ``[layers, experts]`` int, replicas per expert.

A placement policy is a pure function ``(PlacementInput) -> phy2log``. Policies:

- ``contiguous``: experts ``[r*E/R, (r+1)*E/R)`` on rank ``r`` (Megatron's default);
- ``round_robin``: expert ``e`` on rank ``e % R``;
- ``greedy``: longest-processing-time packing of the expected loads, equal slots per rank;
- ``eplb`` / ``eplb_global``: deepseek-ai/EPLB with redundant experts (:mod:`moesim.policies.eplb`);
- ``graph``: partition of the co-activation graph (networkx Kernighan-Lin bisection) so that
  experts chosen together by a token share a node and a GPU (one copy of the token travels);
- ``topology_aware``: node-level co-activation partition, then each node's spare slots hold
  replicas of the hottest experts it lacks (read there with replica choice ``nearest``), then
  load-balanced packing within the node: fewer inter-node bytes for the HBM of the replicas.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from moesim.registry import Registry


@dataclass(frozen=True)
class PlacementInput:
    """What a placement policy sees.

    Attributes:
        loads: ``[layers, experts]`` expected share of assignments per expert.
        ranks: EP ranks.
        slots_per_rank: Physical slots on each rank (``experts / ranks`` plus redundant ones).
        rank_node: ``[ranks]`` node of each rank.
        num_groups: Expert groups (DeepSeek-V3 ``n_group``; 1 without groups).
        coactivation: Returns ``(co [layers, E, E], next [layers - 1, E, E])``: how often two
            experts are chosen by the same token in a layer, and expert ``i`` at a layer then
            ``j`` at the next; computed on demand (only co-activation policies need it).
    """

    loads: np.ndarray
    ranks: int
    slots_per_rank: int
    rank_node: np.ndarray
    num_groups: int = 1
    coactivation: Callable[[], tuple[np.ndarray, np.ndarray]] | None = field(
        default=None, compare=False
    )

    @property
    def experts(self) -> int:
        """Logical experts per layer."""
        return int(self.loads.shape[1])

    @property
    def redundant(self) -> int:
        """Extra slots per layer beyond one per expert."""
        return self.ranks * self.slots_per_rank - self.experts

    @property
    def nodes(self) -> int:
        """Nodes the ranks span."""
        return int(self.rank_node.max()) + 1


PlacementFn = Callable[[PlacementInput], np.ndarray]


@dataclass(frozen=True)
class PlacementPolicy:
    """A placement policy with its traits: adding one is one of these in :data:`PLACEMENTS`.

    Attributes:
        place: ``PlacementInput -> phy2log [layers, slots]``.
        replicas: It can fill redundant slots with replicas of hot experts.
        replica_choice: The replica choice it is meant for (when the scenario names none).
        needs_coactivation: It reads ``PlacementInput.coactivation``.
    """

    place: PlacementFn
    replicas: bool = False
    replica_choice: str = "round_robin"
    needs_coactivation: bool = False


PLACEMENTS: Registry[PlacementPolicy] = Registry("placement")


def placement(
    name: str,
    replicas: bool = False,
    replica_choice: str = "round_robin",
    needs_coactivation: bool = False,
) -> Callable[[PlacementFn], PlacementFn]:
    """Decorator: register a placement function as the policy ``name`` with its traits."""

    def deco(fn: PlacementFn) -> PlacementFn:
        policy = PlacementPolicy(fn, replicas, replica_choice, needs_coactivation)
        PLACEMENTS.register(name)(policy)
        return fn

    return deco


def with_replicas() -> list[str]:
    """Names of the placements that can hold redundant experts."""
    return [n for n in PLACEMENTS.names() if PLACEMENTS.get(n).replicas]


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


def make_placement(name: str, inp: PlacementInput) -> Placement:
    """Run the placement policy ``name`` and check its invariants.

    Raises:
        ValueError: bad settings for the policy, or the policy broke an invariant (an expert
            without a slot, slots that do not split evenly over the ranks).
    """
    policy = PLACEMENTS.get(name)
    asked_for_replicas = inp.redundant and inp.experts % inp.ranks == 0  # else: see _divides
    if asked_for_replicas and not policy.replicas:
        raise ValueError(
            f"placement {name} keeps one copy per expert; redundant_experts needs "
            f"{' or '.join(with_replicas())}"
        )
    phy2log = np.asarray(policy.place(inp), dtype=np.int64)
    layers, experts = inp.loads.shape
    if phy2log.shape != (layers, inp.ranks * inp.slots_per_rank):
        raise ValueError(
            f"placement {name}: phy2log shape {phy2log.shape}, expected "
            f"{(layers, inp.ranks * inp.slots_per_rank)}"
        )
    for layer in range(layers):
        if np.unique(phy2log[layer]).size != experts:
            raise ValueError(f"placement {name}: layer {layer} leaves an expert without a slot")
        if phy2log[layer].min() < 0 or phy2log[layer].max() >= experts:
            raise ValueError(f"placement {name}: layer {layer} names an unknown expert")
    return Placement(phy2log=phy2log, ranks=inp.ranks)


def simple_input(loads: np.ndarray, ranks: int, redundant: int = 0) -> PlacementInput:
    """A one-node input without co-activation data (tests, validation)."""
    experts = loads.shape[1]
    if (experts + redundant) % ranks:
        raise ValueError(f"{ranks} ranks do not divide {experts} experts + {redundant} redundant")
    return PlacementInput(
        loads=np.asarray(loads, dtype=np.float64),
        ranks=ranks,
        slots_per_rank=(experts + redundant) // ranks,
        rank_node=np.zeros(ranks, dtype=np.int64),
    )


def _divides(name: str, inp: PlacementInput) -> None:
    if inp.experts % inp.ranks:
        raise ValueError(
            f"{name} placement needs ep ({inp.ranks}) to divide experts ({inp.experts})"
        )


@placement("contiguous")
def contiguous(inp: PlacementInput) -> np.ndarray:
    """Experts ``[r*E/R, (r+1)*E/R)`` on rank ``r`` in every layer (Megatron's default)."""
    _divides("contiguous", inp)
    return np.tile(np.arange(inp.experts), (inp.loads.shape[0], 1))


@placement("round_robin")
def round_robin(inp: PlacementInput) -> np.ndarray:
    """Expert ``e`` on rank ``e % R``: slot ``j`` of rank ``r`` holds expert ``r + j * R``."""
    _divides("round_robin", inp)
    r, j = np.divmod(np.arange(inp.experts), inp.slots_per_rank)
    return np.tile(r + j * inp.ranks, (inp.loads.shape[0], 1))


def _slots_from_packs(pack: np.ndarray, rank_in_pack: np.ndarray, per_pack: int) -> np.ndarray:
    """phy2log from each item's pack and place in it (items are the logical experts)."""
    slot = pack * per_pack + rank_in_pack
    phy2log = np.empty_like(slot)
    np.put_along_axis(phy2log, slot, np.broadcast_to(np.arange(slot.shape[1]), slot.shape), 1)
    return phy2log


@placement("greedy")
def greedy(inp: PlacementInput) -> np.ndarray:
    """Longest-processing-time packing: heaviest expert first, to the lightest rank with room."""
    from moesim.policies.eplb import balanced_packing

    _divides("greedy", inp)
    pack, rank = balanced_packing(inp.loads, inp.ranks)
    return _slots_from_packs(pack, rank, inp.slots_per_rank)


def _eplb(inp: PlacementInput, policy: str) -> np.ndarray:
    from moesim.policies.eplb import rebalance

    groups = inp.num_groups if policy != "global" else 1
    return rebalance(
        inp.loads, inp.ranks * inp.slots_per_rank, groups, inp.nodes, inp.ranks, policy
    )


@placement("eplb", replicas=True)
def eplb(inp: PlacementInput) -> np.ndarray:
    """EPLB: hierarchical when the nodes divide the expert groups, else global."""
    return _eplb(inp, "auto")


@placement("eplb_global", replicas=True)
def eplb_global(inp: PlacementInput) -> np.ndarray:
    """EPLB's global policy (one group, one node) whatever the groups."""
    return _eplb(inp, "global")


def _bisect_parts(
    co: np.ndarray, load: np.ndarray, items: np.ndarray, parts: int
) -> list[np.ndarray]:
    """Split ``items`` into ``parts`` equal groups with heavy co-activation inside groups.

    Recursive Kernighan-Lin bisection (networkx) of the graph whose edge weights are ``co``,
    started from a load-balanced split (heaviest item first, to the side with the lower load
    per free place); KL swaps pairs, so the sizes of the starting halves are kept.
    """
    import networkx as nx

    if parts == 1:
        return [items]
    left = parts // 2
    size = [items.size * left // parts, items.size - items.size * left // parts]
    sides: list[list[int]] = [[], []]
    side_load = [0.0, 0.0]
    for i in items[np.argsort(-load[items], kind="stable")].tolist():
        room = [len(sides[j]) < size[j] for j in (0, 1)]
        j = 0 if not room[1] else 1 if not room[0] else int(side_load[1] < side_load[0])
        sides[j].append(i)
        side_load[j] += float(load[i])
    g = nx.Graph()
    g.add_nodes_from(items.tolist())
    sub = co[np.ix_(items, items)]
    ii, jj = np.nonzero(np.triu(sub, 1))
    g.add_weighted_edges_from(
        zip(items[ii].tolist(), items[jj].tolist(), sub[ii, jj].tolist(), strict=True)
    )
    a, b = nx.community.kernighan_lin_bisection(g, partition=(set(sides[0]), set(sides[1])), seed=0)
    first, second = np.array(sorted(a)), np.array(sorted(b))
    return _bisect_parts(co, load, first, left) + _bisect_parts(co, load, second, parts - left)


def _greedy_match(affinity: np.ndarray) -> np.ndarray:
    """``perm[p]``: the target of part ``p``, taking the largest affinity pairs first."""
    n = affinity.shape[0]
    perm = np.full(n, -1)
    used = np.zeros(n, dtype=bool)
    for flat in np.argsort(-affinity, axis=None, kind="stable"):
        p, t = divmod(int(flat), n)
        if perm[p] < 0 and not used[t]:
            perm[p], used[t] = t, True
    return perm


def _need_coactivation(name: str, inp: PlacementInput) -> tuple[np.ndarray, np.ndarray]:
    if inp.coactivation is None:
        raise ValueError(f"placement {name} needs co-activation counts from the routing source")
    return inp.coactivation()


@placement("graph", needs_coactivation=True)
def graph(inp: PlacementInput) -> np.ndarray:
    """Co-activation graph partition: nodes first, then the GPUs of each node.

    Experts that the same tokens choose land on the same node (a hierarchical all-to-all sends
    the token over RDMA once) and GPU (a direct all-to-all sends it once). Layer by layer, the
    parts are then numbered so that experts that tokens choose in consecutive layers share a
    GPU (what lets systems that keep tokens on the expert's GPU skip a combine; moesim's
    dispatch/combine returns tokens home after every layer, so that numbering does not change
    its bytes).
    """
    _divides("graph", inp)
    co, nxt = _need_coactivation("graph", inp)
    layers, e = inp.loads.shape
    nodes, per_node = inp.nodes, inp.ranks // inp.nodes
    out = np.empty((layers, e), dtype=np.int64)
    prev_rank = None
    for layer in range(layers):
        sym = co[layer] + co[layer].T
        load = inp.loads[layer]
        node_parts = _bisect_parts(sym, load, np.arange(e), nodes)
        parts = [p for n in node_parts for p in _bisect_parts(sym, load, n, per_node)]
        if prev_rank is not None:  # number parts after the previous layer's ranks
            aff = np.zeros((inp.ranks, inp.ranks))
            for p, items in enumerate(parts):
                aff[p] = np.bincount(
                    prev_rank, weights=nxt[layer - 1][:, items].sum(axis=1), minlength=inp.ranks
                )
            node_aff = aff.reshape(nodes, per_node, nodes, per_node).sum(axis=(1, 3))
            node_perm = _greedy_match(node_aff)
            order = np.empty(inp.ranks, dtype=np.int64)
            for n in range(nodes):
                block = aff[n * per_node : (n + 1) * per_node]
                target = node_perm[n] * per_node
                sub = block[:, target : target + per_node]
                order[n * per_node : (n + 1) * per_node] = target + _greedy_match(sub)
            placed: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * inp.ranks
            for p, items in enumerate(parts):
                placed[int(order[p])] = items
            parts = placed
        out[layer] = np.concatenate(parts)
        prev_rank = np.empty(e, dtype=np.int64)
        prev_rank[out[layer]] = np.arange(e) // inp.slots_per_rank
    return out


@placement("topology_aware", replicas=True, replica_choice="nearest", needs_coactivation=True)
def topology_aware(inp: PlacementInput) -> np.ndarray:
    """Fewer inter-node bytes for replica HBM.

    Experts are split over nodes by co-activation; each node's spare slots (redundant experts
    divided over the nodes) then hold replicas of the hottest experts the node lacks, so that
    with replica choice ``nearest`` their tokens stay inside the node (further spare slots go
    to the node's experts with the largest load per replica); finally each node's copies are
    packed onto its GPUs, heaviest first.
    """
    from moesim.policies.eplb import balanced_packing, replicate_experts

    layers, e = inp.loads.shape
    nodes, per_node = inp.nodes, inp.ranks // inp.nodes
    if e % nodes or inp.redundant % nodes:
        raise ValueError(
            f"topology_aware placement needs the nodes ({nodes}) to divide the experts ({e}) "
            f"and the redundant experts ({inp.redundant})"
        )
    co = _need_coactivation("topology_aware", inp)[0] if nodes > 1 else None
    extra = inp.redundant // nodes
    node_slots = per_node * inp.slots_per_rank
    out = np.empty((layers, inp.ranks * inp.slots_per_rank), dtype=np.int64)
    for layer in range(layers):
        load = inp.loads[layer]
        if co is None:
            node_parts = [np.arange(e)]
        else:
            node_parts = _bisect_parts(co[layer] + co[layer].T, load, np.arange(e), nodes)
        node_copies = []
        for own in node_parts:
            others = np.setdiff1d(np.arange(e), own)
            hot = others[np.argsort(-load[others], kind="stable")][:extra]
            copies = np.concatenate([own, hot])
            if copies.size < node_slots:  # more spare slots than missing experts
                phy, _, _ = replicate_experts(load[copies][None, :], node_slots)
                copies = copies[phy[0]]
            node_copies.append(copies)
        holders = sum(np.bincount(np.unique(c), minlength=e) for c in node_copies)
        # tokens of a node go to its own copies; nodes without a copy spread over the holders
        served = load / nodes * (1 + (nodes - holders) / np.maximum(holders, 1))
        for n, copies in enumerate(node_copies):
            in_node = np.bincount(copies, minlength=e)
            weight = served[copies] / in_node[copies]
            pack, rank = balanced_packing(weight[None, :], per_node)
            block = np.empty(node_slots, dtype=np.int64)
            block[(pack * inp.slots_per_rank + rank)[0]] = copies
            out[layer, n * node_slots : (n + 1) * node_slots] = block
    return out
