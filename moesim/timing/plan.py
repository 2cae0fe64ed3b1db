"""Per-step work of every GPU, prepared on arrays before the SimPy engine runs it.

The plan maps the routing stage's per-replica counts onto GPUs and prices each compute piece
with the cost model, so that the engine only looks values up.

GPU layout (see :mod:`moesim.config.scenario`): ``gpu = (replica * ep + rank) * tp + tp_rank``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from moesim.comm.alltoall import ALL_TO_ALL, Exchange, Flows, PairFlows
from moesim.config.loading import ResolvedScenario
from moesim.dtypes import ELEMENT_BYTES, token_bytes
from moesim.routing.stage import StepRouting
from moesim.timing.costs import OpCostModel, layer_blocks, total


@dataclass(frozen=True)
class Layout:
    """Where each GPU sits: ``replica``, EP ``rank`` and ``tp_rank`` arrays of length world."""

    replica: np.ndarray
    rank: np.ndarray
    tp_rank: np.ndarray
    ep: int
    tp: int
    ep_groups: list[np.ndarray]
    tp_groups: list[np.ndarray]

    @classmethod
    def of(cls, r: ResolvedScenario) -> Layout:
        """The layout of a scenario."""
        par = r.scenario.parallelism
        g = np.arange(par.world)
        replica, tp_rank = g // (par.ep * par.tp), g % par.tp
        ep_groups = [
            replica[i] * par.ep * par.tp + tp_rank[i] + np.arange(par.ep) * par.tp for i in g
        ]
        tp_groups = [i - tp_rank[i] + np.arange(par.tp) for i in g]
        return cls(
            replica=replica,
            rank=(g // par.tp) % par.ep,
            tp_rank=tp_rank,
            ep=par.ep,
            tp=par.tp,
            ep_groups=ep_groups,
            tp_groups=tp_groups,
        )

    def ep_group(self, gpu: int) -> np.ndarray:
        """GPUs of ``gpu``'s EP group (same replica and tp rank), in rank order."""
        return self.ep_groups[gpu]

    def tp_group(self, gpu: int) -> np.ndarray:
        """GPUs of ``gpu``'s TP group."""
        return self.tp_groups[gpu]


@dataclass(frozen=True)
class StepPlan:
    """Seconds of each compute piece and the routing of one step.

    Attributes:
        attention: Forward seconds of one attention block (all GPUs alike).
        gate / shared / dense: Forward seconds of the router block, shared experts, dense FFN.
        experts: ``[moe_layers, world]`` forward seconds of each GPU's routed experts.
        backward: The same pieces' backward seconds (training; empty otherwise), by name.
        ops: Seconds per step of every op, forward and (``<op>_bwd``) backward, averaged over
            GPUs (``ops_s`` of the summary).
        routing: The routing stage's output.
        tokens_per_rank: Tokens each EP rank runs attention for.
    """

    attention: float
    gate: float
    shared: float
    dense: float
    experts: np.ndarray
    backward: dict[str, Any]
    ops: dict[str, float]
    routing: StepRouting
    tokens_per_rank: int


def gpu_slot_tokens(layout: Layout, routing: StepRouting) -> np.ndarray:
    """``[L, world, slots]`` tokens each GPU's expert slots compute in each MoE layer."""
    slot = np.stack([c.slot_tokens for c in routing.replicas])  # [dp, L, ep, S]
    return np.moveaxis(slot[layout.replica, :, layout.rank, :], 0, 1)  # [world, L, S] -> [L, ...]


def make_plan(
    r: ResolvedScenario,
    layout: Layout,
    costs: OpCostModel,
    routing: StepRouting,
    step: int,
    on_gpu: np.ndarray | None = None,
    per_gpu: np.ndarray | None = None,
) -> StepPlan:
    """Price one step's compute for every GPU (``on_gpu``: ``[L, world, slots]`` the slots a
    GPU computes itself, the others running on the host CPUs; ``per_gpu``: the step's
    :func:`gpu_slot_tokens`, when the caller has them)."""
    m, w = r.model, r.scenario.workload
    batch = routing.batch
    tokens = batch.tokens_per_rank
    seqs = int(np.unique(batch.seq_id[0]).size)  # a micro-batch holds part of them
    decode, train = w.mode == "decode", w.mode == "train"
    if decode:
        context = kv = float(w.context_len + step)
        kv_tokens = seqs * kv
    else:  # mean causal context of the batch's queries (seq_len/2 for whole sequences)
        context, kv_tokens = float(batch.position[0].mean()) + 0.5, 0.0
    if per_gpu is None:
        per_gpu = gpu_slot_tokens(layout, routing)
    slots = per_gpu if on_gpu is None else per_gpu * on_gpu
    n_moe = len(m.moe_layers)
    layers = {"attention": m.num_layers, "router": n_moe, "shared": n_moe}
    layers["dense"] = m.num_layers - n_moe
    ops: dict[str, float] = {}

    def pieces(backward: bool) -> dict[str, Any]:
        """Each piece's seconds in one direction; its ops' seconds per step into ``ops``."""
        sfx = "_bwd" if backward else ""
        blocks = layer_blocks(
            costs, float(tokens), context, kv_tokens, decode, w.seq_len, train, slots, backward
        )
        for block, times in blocks.items():
            for op, sec in times.items():
                a = np.asarray(sec)  # experts: [L, world]; summed over layers, mean over GPUs
                per_step = a.sum(axis=0).mean() if block == "experts" else a * layers[block]
                ops[op + sfx] = ops.get(op + sfx, 0.0) + float(per_step)
        sums = {block: total(times) for block, times in blocks.items()}
        return {
            "attention": float(sums["attention"]),
            "gate": float(sums["router"]),
            "shared": float(sums.get("shared", 0.0)),
            "dense": float(sums.get("dense", 0.0)),
            "experts": sums["experts"] * np.ones(slots.shape[:2]),
        }

    forward = pieces(False)
    return StepPlan(
        **forward,
        backward=pieces(True) if train else {},
        ops=ops,
        routing=routing,
        tokens_per_rank=tokens,
    )


class FlowBuilder:
    """Builds the flows of each communication phase of a step."""

    def __init__(self, r: ResolvedScenario, layout: Layout) -> None:
        w, h = r.scenario.workload, r.model.hidden_size
        self.layout = layout
        self.algorithm = ALL_TO_ALL.get(r.scenario.policies.all_to_all.type)
        self.dispatch_bytes = token_bytes(h, w.dispatch_dtype)
        self.combine_bytes = token_bytes(h, w.combine_dtype)
        self.gradient_bytes = token_bytes(h, w.gradient_dtype)
        self.hidden = h
        # activations are all-reduced in the compute precision, never in fp8 (TE and
        # Megatron keep fp8 for GEMM inputs only): 2 bytes for bf16/fp16/fp8, 4 for fp32
        self.activation_bytes = max(ELEMENT_BYTES[w.dtype], 2.0)
        self.rank_node = np.array(r.scenario.parallelism.rank_nodes(r.gpus_per_node))

    def alltoall(self, plan: StepPlan, moe_idx: int, gpu: int, phase: str) -> Flows:
        """Flows of ``phase`` (dispatch, combine, or their backward) in ``gpu``'s EP group.

        Forward dispatch sends tokens to their experts and combine sends them back; backward
        reverses both directions and carries gradients in ``workload.gradient_dtype``.
        """
        ex = self._exchange(plan, moe_idx, gpu)
        if phase == "dispatch":
            return self.algorithm.dispatch(ex, self.dispatch_bytes)
        if phase == "combine":
            return self.algorithm.combine(ex, self.combine_bytes)
        # backward: gradients of the combine go to the experts (the dispatch's direction),
        # gradients of the dispatch come back (the combine's), both in workload.gradient_dtype
        if phase == "combine_bwd":
            return self.algorithm.dispatch(ex, self.gradient_bytes)
        return self.algorithm.combine(ex, self.gradient_bytes)

    def _exchange(self, plan: StepPlan, moe_idx: int, gpu: int) -> Exchange:
        """Who sends how many tokens to whom in ``gpu``'s EP group at MoE layer ``moe_idx``."""
        counts = plan.routing.replicas[self.layout.replica[gpu]]
        return Exchange(
            copies=counts.rank_copies[moe_idx],
            node_copies=counts.node_copies[moe_idx],
            rank_gpu=self.layout.ep_group(gpu),
            rank_node=self.rank_node,
            assignments=counts.assignments[moe_idx],
            tokens_per_rank=plan.tokens_per_rank,
        )

    def alltoall_pairs(
        self, plan: StepPlan, moe_idx: int, gpu: int, phase: str
    ) -> PairFlows | None:
        """:meth:`alltoall`'s forward ``phase`` as its count matrix, for an algorithm whose
        flows are one per entry (:attr:`moesim.comm.alltoall.AllToAll.pairs`); else None."""
        if self.algorithm.pairs is None or phase not in ("dispatch", "combine"):
            return None
        ex = self._exchange(plan, moe_idx, gpu)
        combine = phase == "combine"  # the dispatch's flows reversed
        tb = self.combine_bytes if combine else self.dispatch_bytes
        return PairFlows(self.algorithm.pairs(ex), ex.rank_gpu, tb, combine, self.algorithm.via_nic)

    def migration(self, moved: np.ndarray, gpu: int) -> Flows:
        """Expert weights moved between the ranks of ``gpu``'s EP group.

        Args:
            moved: ``[ranks, ranks]`` bytes per tensor-parallel GPU from rank ``s`` to ``d``.
        """
        group = self.layout.ep_group(gpu)
        s, d = np.nonzero(moved)
        return Flows(src=group[s], dst=group[d], nbytes=moved[s, d].astype(np.float64))

    def tp_allreduce(self, plan: StepPlan, gpu: int) -> Flows:
        """Ring all-reduce of the TP group: each GPU sends 2(tp-1)/tp of the activations."""
        group = self.layout.tp_group(gpu)
        tp = group.size
        size = plan.tokens_per_rank * self.hidden * self.activation_bytes * 2.0 * (tp - 1) / tp
        return Flows(src=group, dst=np.roll(group, -1), nbytes=np.full(tp, size))
