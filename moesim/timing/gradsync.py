"""Data-parallel gradient synchronisation and the optimizer step of a training step.

As Megatron-Core's ``DistributedDataParallel`` and distributed optimizer do
(``megatron/core/distributed``, ``megatron/core/optimizer/distrib_optimizer.py``):

- **Groups.** A dense parameter (attention, router, shared and dense FFNs, embeddings) is
  replicated on every EP rank of every replica: its gradient is reduced over the GPUs of one
  tensor-parallel position, ``ep * dp`` of them. An expert's parameters are replicated across
  replicas only: over the GPUs of one EP rank and TP position, ``dp`` of them (expert data
  parallelism). A group of one GPU has nothing to reduce.
- **Buckets.** Gradients are grouped, in the order the backward pass produces them (last
  layer first; the output head with the last layer, the embedding with the first), into
  buckets of at least ``bucket_params`` parameters per GPU (Megatron-Core's default:
  ``max(40M, 1M x group size)``), dense and expert apart. With
  ``overlap_grad_reduce`` a bucket is reduced as soon as the backward pass of its last layer
  ends, while the backward pass goes on; without it, every bucket after the backward pass.
- **Collectives.** Ring collectives over the group (:func:`ring`: one ring per GPU a node
  holds of the group, as NCCL's channels, so that traffic between nodes uses every NIC):
  plain data parallelism
  (``zero: 0``) all-reduces a bucket (each GPU sends ``2 (n-1)/n`` of its bytes); the
  distributed optimizer (``zero: 1``, ZeRO-1) and ZeRO-2 reduce-scatter it (``(n-1)/n``) and,
  after the optimizer step, all-gather the updated parameters (``(n-1)/n`` of them, in the
  weight dtype). Gradients travel in ``policies.optimizer.grad_reduce_dtype`` (bf16:
  Megatron-Core's ``grad_reduce_in_fp32`` is off by default). ZeRO-3 reduce-scatters too, but
  keeps the parameters sharded: each layer's are all-gathered before it runs, forward and
  backward (:mod:`moesim.timing.training`), and none after the step.
- **Optimizer step.** Adam over the GPU's shard (all its parameters with ``zero: 0``, a
  ``1/n`` share of each group's with ZeRO), memory-bound: per parameter it reads the fp32
  master weight, both fp32 moments and the gradient, and writes the three fp32 values and the
  weight: ``24 + g + w`` bytes (``g``, ``w``: gradient and weight dtype bytes), at the
  profile's HBM bandwidth times its ``memory_efficiency``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from moesim.comm.alltoall import Flows
from moesim.config.loading import ResolvedScenario
from moesim.dtypes import ELEMENT_BYTES

KINDS = ("dense", "expert")


@dataclass(frozen=True)
class Bucket:
    """Gradients reduced together.

    Attributes:
        kind: ``dense`` or ``expert``.
        index: Position among the buckets of its kind, in launch order.
        layer: The layer whose backward pass completes it.
        params: Parameters per GPU.
    """

    kind: str
    index: int
    layer: int
    params: float


def layer_params(r: ResolvedScenario) -> tuple[np.ndarray, np.ndarray]:
    """``(dense, expert)``: ``[layers]`` parameters one GPU holds of each layer (its 1/tp
    slice); the output head is counted with the last layer, the embedding with the first."""
    m, tp = r.model, r.scenario.parallelism.tp
    dense = np.full(m.num_layers, float(m.attention.params(m.hidden_size)))
    expert = np.zeros(m.num_layers)
    for layer in range(m.num_layers):
        if m.is_moe_layer(layer):
            dense[layer] += m.gate_params + m.shared_params
            expert[layer] = r.slots_per_rank * m.expert_params
        else:
            dense[layer] += m.dense_ffn_params
    table = m.vocab_size * m.hidden_size
    dense[0] += table
    if not m.tie_word_embeddings:
        dense[-1] += table
    return dense / tp, expert / tp


def group_sizes(r: ResolvedScenario) -> dict[str, int]:
    """GPUs that reduce each kind of gradient together."""
    par = r.scenario.parallelism
    return {"dense": par.ep * par.dp, "expert": par.dp}


def buckets(r: ResolvedScenario, layers: Sequence[int] | None = None) -> list[Bucket]:
    """The buckets of one GPU holding ``layers`` (default: all), dense then expert, each in
    launch order (none for a kind whose group is one GPU)."""
    setting = r.scenario.policies.optimizer.bucket_params
    sizes = group_sizes(r)
    out: list[Bucket] = []
    for kind, per_layer in zip(KINDS, layer_params(r), strict=True):
        if sizes[kind] < 2:
            continue
        # Megatron-Core's default: max(40M, 1M x data-parallel size) parameters
        limit = setting or max(40_000_000, 1_000_000 * sizes[kind])
        held = sorted(range(per_layer.size) if layers is None else layers, reverse=True)
        size, index = 0.0, 0
        for layer in held:
            size += per_layer[layer]
            if size > 0 and (size >= limit or layer == held[-1]):
                out.append(Bucket(kind, index, layer, size))
                size, index = 0.0, index + 1
    return out


def group_of(kind: str, gpu: int, rank: np.ndarray, tp_rank: np.ndarray) -> np.ndarray:
    """The GPUs ``gpu`` reduces ``kind`` gradients with (itself included), in GPU order."""
    same = tp_rank == tp_rank[gpu]
    if kind == "expert":
        same &= rank == rank[gpu]
    return np.flatnonzero(same)


def ring(group: np.ndarray, nbytes: float, gpus_per_node: int) -> Flows:
    """A ring collective's traffic: each GPU of ``group`` sends ``nbytes`` in all to its
    successors. A group spanning nodes with ``L`` of its GPUs on each runs ``L`` rings (NCCL's
    channels), ring ``j`` entering each node at its ``j``-th GPU, each carrying ``1/L`` of the
    bytes, so the hops between nodes spread over ``L`` NICs instead of queueing on one."""
    node = group // gpus_per_node
    per_node = [group[node == n] for n in np.unique(node)]
    lanes = min(len(members) for members in per_node)
    if len(per_node) == 1 or lanes == 1:
        lanes, orders = 1, [group]
    else:
        orders = [np.concatenate([np.roll(m, -j) for m in per_node]) for j in range(lanes)]
    src = np.concatenate(orders)
    dst = np.concatenate([np.roll(o, -1) for o in orders])
    return Flows(src=src, dst=dst, nbytes=np.full(src.size, float(nbytes) / lanes))


def sync_bytes(r: ResolvedScenario, params: float, n: int) -> float:
    """Bytes each of ``n`` GPUs sends to reduce ``params`` gradients: an all-reduce, or the
    reduce-scatter of ZeRO."""
    share = (n - 1) / n
    opt = r.scenario.policies.optimizer
    grad = params * ELEMENT_BYTES[opt.grad_reduce_dtype]
    return grad * share * (2.0 if opt.zero == 0 else 1.0)


def gather_bytes(r: ResolvedScenario, params: float, n: int) -> float:
    """Bytes each of ``n`` GPUs sends to all-gather ``params`` updated weights (ZeRO), else 0."""
    if r.scenario.policies.optimizer.zero in (0, 3):  # ZeRO-3 keeps them sharded
        return 0.0
    return params * ELEMENT_BYTES[r.scenario.workload.dtype] * (n - 1) / n


def param_gather_bytes(r: ResolvedScenario, params: float, n: int) -> float:
    """Bytes each of ``n`` GPUs sends to all-gather ``params`` parameters before a layer runs
    (ZeRO-3), in the weight dtype."""
    return params * ELEMENT_BYTES[r.scenario.workload.dtype] * (n - 1) / n


def shard_params(r: ResolvedScenario, layers: Sequence[int] | None = None) -> float:
    """Parameters whose optimizer state one GPU holding ``layers`` (default: all) keeps and
    updates: all it holds, or with ZeRO a ``1/n`` share of each kind over its group."""
    zero, sizes = r.scenario.policies.optimizer.zero, group_sizes(r)
    held = slice(None) if layers is None else list(layers)
    per_kind = [p[held].sum() for p in layer_params(r)]
    return float(sum(p / (sizes[k] if zero else 1) for k, p in zip(KINDS, per_kind, strict=True)))


def adam_bytes_per_param(r: ResolvedScenario) -> float:
    """HBM bytes Adam moves per parameter (see the module docstring)."""
    grad = ELEMENT_BYTES[r.scenario.policies.optimizer.grad_reduce_dtype]
    return 24.0 + grad + ELEMENT_BYTES[r.scenario.workload.dtype]


def optimizer_seconds(r: ResolvedScenario, layers: Sequence[int] | None = None) -> float:
    """Seconds of the Adam step of one GPU holding ``layers`` (default: all) over its shard."""
    gpu = r.hardware.gpu
    bandwidth = gpu.hbm_bandwidth_gb_per_s * 1e9 * gpu.memory_efficiency
    return shard_params(r, layers) * adam_bytes_per_param(r) / bandwidth
